"""ROCO v1: the real GitHub release files (no images shipped: small JPEGs are generated here) and Kaggle CSVs."""

from __future__ import annotations

import csv

import pytest

from tests.data_prep.conftest import jpeg_bytes
from tests.data_prep.readback import check_accounting, reasons_by_id

FIXTURE_IDS = {
    ("validation", "radiology"): ["ROCO_00020", "ROCO_00027", "ROCO_00059", "ROCO_00062", "ROCO_02867", "ROCO_04015"],
    ("validation", "non-radiology"): ["ROCO_81834", "ROCO_81840", "ROCO_81862"],
    ("train", "non-radiology"): ["ROCO_81826", "ROCO_81828", "ROCO_81829"],
}


@pytest.fixture
def roco_root(copy_fixture):
    """The real ROCO files with a JPEG per ID, except ROCO_00062 (missing) and ROCO_00027 (named as fetch.py does)."""
    root = copy_fixture("roco")
    for (split, cls), ids in FIXTURE_IDS.items():
        images = root / "data" / split / cls / "images"
        images.mkdir()
        for i, rid in enumerate(ids):
            if rid == "ROCO_00062":
                continue
            name = "PMC2766744_cios-1-176-g005.jpg" if rid == "ROCO_00027" else f"{rid}.jpg"
            (images / name).write_bytes(jpeg_bytes(seed=i))
    return root


def by_id(samples):
    return {s["json"]["id"]: s for s in samples}


def test_roco_release(roco_root, tmp_path, run_cli):
    code, out, _ = run_cli("roco", roco_root, "-o", tmp_path / "out", "--samples-per-shard", "4")
    assert code == 0
    manifest, samples, rejected = check_accounting(tmp_path / "out", out)
    assert manifest["counts"] == {"read": 12, "written": 11, "rejected": 1}
    assert reasons_by_id(rejected) == {"ROCO_00062": "missing_image"}
    assert manifest["splits"]["val"]["written"] == 8 and manifest["splits"]["train"]["written"] == 3
    assert manifest["splits"]["val"]["shards"] == ["val-000000.tar", "val-000001.tar"]
    samples = by_id(samples)

    # Leading space of the caption (after the tab) is stripped; the rest is as released.
    assert samples["ROCO_00027"]["txt"] == "Postoperative anteroposterior radiograph of the pelvis."
    assert samples["ROCO_00059"]["txt"].startswith(
        "Angiography of the internal carotid artery, late arterial phase. (A) –"
    )

    meta = samples["ROCO_00020"]["json"]
    assert meta["source"] == "roco" and meta["split"] == "val" and meta["modality"] == "radiology"
    assert meta["cuis"][:3] == ["C4300092", "C0040395", "C1692321"] and len(meta["cuis"]) == 17
    assert meta["semtypes"][0] == {"code": "T046", "name": "Pathologic Function"}
    assert meta["semtypes"][-1] == {"code": "T109", "name": "Organic Chemical"}
    assert meta["keywords"][:3] == ["pelvi", "scan", "wall"]
    assert meta["licence"] == "CC BY" and meta["pmc_image"] == "PMC3970251_CRIONM2014-931546.003.jpg"
    assert meta["pmcid"] == "PMC3970251" and meta["image_name"] == "CRIONM2014-931546.003.jpg"
    assert meta["labels"] == []
    assert samples["ROCO_00059"]["json"]["licence"] == "NO-CC CODE"
    assert samples["ROCO_02867"]["json"]["cuis"] == [] and samples["ROCO_02867"]["json"]["semtypes"] == []
    assert samples["ROCO_81834"]["json"]["modality"] == "non-radiology"
    assert samples["ROCO_81826"]["json"]["split"] == "train"
    # The generated JPEG needs no resize: stored byte for byte.
    assert (
        samples["ROCO_00020"]["image"] == (roco_root / "data/validation/radiology/images/ROCO_00020.jpg").read_bytes()
    )
    # CUIs are counted for the label vocabulary (C0030797 "pelvis" appears in two val records).
    assert manifest["label_counts"]["val"]["C0030797"] == 2


def test_roco_bad_lines_and_short_captions(roco_root, tmp_path, run_cli):
    captions = roco_root / "data/train/non-radiology/captions.txt"
    with open(captions, "ab") as f:
        f.write(b"ROCO_99998\t caf\xe9 latin-1 caption\n")  # not UTF-8
        f.write(b"ROCO_99999 no tab in this line\n")
        f.write(b"ROCO_81826\t a second line with an id seen before\n")
    code, out, _ = run_cli("roco", roco_root, "-o", tmp_path / "out", "--min-caption-words", "3")
    assert code == 0
    manifest, samples, rejected = check_accounting(tmp_path / "out", out)
    reasons = [(r["id"], r["reason"]) for r in rejected]
    assert ("ROCO_04015", "caption_too_short") in reasons  # "Preop CT."
    assert ("ROCO_99998", "undecodable_text") in reasons
    assert ("ROCO_99999 no tab in this line", "malformed_record") in reasons
    assert ("ROCO_81826", "duplicate_id") in reasons
    assert manifest["counts"]["read"] == 15


def write_kaggle(root, rows, images):
    split = root / "all_data" / "train"
    (split / "radiology" / "images").mkdir(parents=True)
    with open(split / "radiologytraindata.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "name", "caption"])
        writer.writerows(rows)
    for name in images:
        (split / "radiology" / "images" / name).write_bytes(jpeg_bytes())
    return root / "all_data"


def test_roco_kaggle_layout(tmp_path, run_cli):
    rows = [
        ["ROCO_00020", "PMC3970251_CRIONM2014-931546.003.jpg", " Axial computed tomography scan of the pelvis."],
        ["ROCO_00027", "PMC2766744_cios-1-176-g005.jpg", " Postoperative anteroposterior radiograph, pelvis"],
        ["ROCO_00028", "../../outside.jpg", " escaping path"],
        ["ROCO_00029", "/etc/hostname", " absolute path"],
    ]
    root = write_kaggle(tmp_path / "kaggle", rows, [rows[0][1], rows[1][1]])
    code, out, _ = run_cli("roco", root, "-o", tmp_path / "out")
    assert code == 0
    manifest, samples, rejected = check_accounting(tmp_path / "out", out)
    assert reasons_by_id(rejected) == {"ROCO_00028": "path_escape", "ROCO_00029": "path_escape"}
    assert by_id(samples)["ROCO_00020"]["txt"] == "Axial computed tomography scan of the pelvis."
    assert by_id(samples)["ROCO_00020"]["json"]["modality"] == "radiology"
