"""ROCOv2: the real caption/concept/mapping CSV rows (quoted captions with commas, ';'-separated CUIs)."""

from __future__ import annotations

import csv

from tests.data_prep.conftest import jpeg_bytes
from tests.data_prep.readback import check_accounting, reasons_by_id


def caption_rows(root):
    with open(root / "test_captions.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_rocov2_release(copy_fixture, tmp_path, run_cli):
    root = copy_fixture("rocov2")
    rows = caption_rows(root)
    (root / "test").mkdir()
    for i, row in enumerate(rows):
        if row["ID"] != "ROCOv2_2023_test_000012":  # left without image
            (root / "test" / f"{row['ID']}.jpg").write_bytes(jpeg_bytes(seed=i))
    with open(root / "test_captions.csv", "ab") as f:
        f.write(b'ROCOv2_2023_test_000013,"caf\xe9, not UTF-8"\n')
        f.write(b"ROCOv2_2023_test_000014,\n")
        f.write(b'ROCOv2_2023_test_000001,"the same ID again"\n')
    code, out, _ = run_cli("rocov2", root, "-o", tmp_path / "out")
    assert code == 0
    manifest, samples, rejected = check_accounting(tmp_path / "out", out)
    assert manifest["counts"] == {"read": 15, "written": 11, "rejected": 4}
    assert reasons_by_id(rejected) == {
        "ROCOv2_2023_test_000012": "missing_image",
        "ROCOv2_2023_test_000013": "undecodable_text",
        "ROCOv2_2023_test_000014": "empty_caption",
        "ROCOv2_2023_test_000001": "duplicate_id",
    }
    by_id = {s["json"]["id"]: s for s in samples}
    assert {s["json"]["split"] for s in samples} == {"test"}
    # Quoted CSV: the commas belong to the caption.
    assert by_id["ROCOv2_2023_test_000006"]["txt"] == next(r["Caption"] for r in rows if r["ID"].endswith("000006"))
    assert ", and no extravasation" in by_id["ROCOv2_2023_test_000006"]["txt"]
    meta = by_id["ROCOv2_2023_test_000001"]["json"]
    assert meta["cuis"] == ["C0040405", "C0856747"] and meta["cuis_manual"] == ["C0040405"]
    assert meta["cui_names"] == {"C0856747": "Aneurysm, Ascending Aorta"}
    assert meta["modality"] == "radiology" and meta["source"] == "rocov2"
    assert by_id["ROCOv2_2023_test_000004"]["json"]["cuis"] == ["C0002978", "C0034052", "C0521377"]
    assert manifest["label_counts"]["test"]["C0040405"] == 6  # 7 rows, one without image


def test_rocov2_without_captions_file_is_a_clear_error(tmp_path, run_cli):
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli("rocov2", tmp_path / "empty", "-o", tmp_path / "out")
    assert code == 2 and "test_captions.csv" in err and "Traceback" not in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()
