"""PMC-OA: JSONL rows (image, caption, optional pmcid/url_name/alignment fields) and an image folder."""

from __future__ import annotations

import json

from tests.data_prep.conftest import jpeg_bytes
from tests.data_prep.readback import check_accounting, reasons_by_id


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_pmc_oa_split_files(tmp_path, run_cli):
    root = tmp_path / "pmc_oa"
    images = root / "caption_T060_filtered_top4_sep_v0_subfigures"
    images.mkdir(parents=True)
    for i, name in enumerate(["PMC212319_Fig3_4.jpg", "PMC212319_Fig3_5.jpg", "PMC3000000_F1_1.jpg"]):
        (images / name).write_bytes(jpeg_bytes(seed=i))
    write_jsonl(root / "train.jsonl", [
        {"image": "PMC212319_Fig3_4.jpg", "caption": "Immunostaining of the tumour (×400).", "pmcid": "PMC212319",
         "url_name": "x.jpg", "alignment_type": "exact", "alignment_score": 0.93},
        {"image": "PMC212319_Fig3_5.jpg", "caption": "  Axial T2-weighted MRI, 5 mm lesion.  "},
        {"image": "PMC000_missing.jpg", "caption": "No such file."},
        {"image": "../PMC212319_Fig3_4.jpg", "caption": "Escaping path."},
        {"caption": "No image field."},
    ])  # fmt: skip
    write_jsonl(root / "valid.jsonl", [{"image": "PMC3000000_F1_1.jpg", "caption": "Chest radiograph."}])
    code, out, _ = run_cli("pmc-oa", root, "-o", tmp_path / "out")
    assert code == 0
    manifest, samples, rejected = check_accounting(tmp_path / "out", out)
    assert manifest["counts"] == {"read": 6, "written": 3, "rejected": 3}
    assert reasons_by_id(rejected) == {
        "PMC000_missing.jpg": "missing_image",
        "../PMC212319_Fig3_4.jpg": "path_escape",
        None: "malformed_record",
    }
    by_id = {s["json"]["id"]: s for s in samples}
    first = by_id["PMC212319_Fig3_4.jpg"]
    assert first["txt"] == "Immunostaining of the tumour (×400)." and first["json"]["split"] == "train"
    assert first["json"]["alignment_score"] == 0.93 and first["json"]["pmcid"] == "PMC212319"
    assert by_id["PMC212319_Fig3_5.jpg"]["txt"] == "Axial T2-weighted MRI, 5 mm lesion."
    assert by_id["PMC3000000_F1_1.jpg"]["json"]["split"] == "val"


def test_pmc_oa_single_file_split_by_article(tmp_path, run_cli):
    root = tmp_path / "pmc_oa"
    (root / "images").mkdir(parents=True)
    rows = []
    for article in range(12):
        for fig in range(3):
            name = f"PMC{1000 + article}_F{fig}.jpg"
            (root / "images" / name).write_bytes(jpeg_bytes(size=(16, 16), seed=article * 3 + fig))
            rows.append({"image": name, "caption": f"Figure {fig} of article {article}."})
    write_jsonl(root / "pmc_oa.jsonl", rows)
    code, out, _ = run_cli("pmc-oa", root, "-o", tmp_path / "out", "--val-fraction", "0.3", "--test-fraction", "0.3")
    assert code == 0
    _, samples, _ = check_accounting(tmp_path / "out", out)
    split_of = {}
    for s in samples:
        assert split_of.setdefault(s["json"]["id"].split("_")[0], s["json"]["split"]) == s["json"]["split"]
    assert set(split_of.values()) == {"train", "val", "test"}
