"""MedICaT: the ten real records and their figures; captions must come out byte for byte."""

from __future__ import annotations

import json

from tests.data_prep.readback import check_accounting


def real_records(root):
    return [json.loads(line) for line in (root / "sample.jsonl").read_text(encoding="utf-8").splitlines()]


def test_medicat_real_records(copy_fixture, tmp_path, run_cli):
    root = copy_fixture("medicat")
    code, out, _ = run_cli("medicat", root, "-o", tmp_path / "out", "--max-image-side", "128", "--workers", "2")
    assert code == 0
    manifest, samples, rejected = check_accounting(tmp_path / "out", out)
    records = real_records(root)
    assert manifest["counts"] == {"read": 10, "written": 10, "rejected": 0}
    by_id = {s["json"]["id"]: s for s in samples}
    for record in records:
        sample = by_id[f"{record['pdf_hash']}_{record['fig_uri']}"]
        assert sample["txt"].encode("utf-8") == record["s2_caption"].encode("utf-8")
        meta = sample["json"]
        assert meta["modality"] == ("radiology" if record["radiology"] else "non-radiology")
        assert meta.get("licence") == record["oa_info"]["oa"]["license"]  # left out when the release has null
        assert meta["s2orc_references"] == record["s2orc_references"] and meta["caption_field"] == "s2_caption"
        assert max(meta["image_info"]["width"], meta["image_info"]["height"]) <= 128
    assert by_id["57c9ad0f4aab133f96d40992c46926fabc901ffa_2-Figure1-1.png"]["json"]["licence"] == "cc-by-nc-nd"
    assert manifest["modality_counts"]["train"] == {"radiology": 6, "non-radiology": 4}


def test_medicat_null_fields_bad_lines_and_paper_split(copy_fixture, tmp_path, run_cli):
    root = copy_fixture("medicat")
    records = real_records(root)
    for r, uri in ((records[2], "8-Figure8-1.png"), (records[3], "7-Figure7-1.png")):  # figures for new records
        figure = root / "figures" / f"{r['pdf_hash']}_{r['fig_uri']}"
        figure.with_name(f"{r['pdf_hash']}_{uri}").write_bytes(figure.read_bytes())
    extra = [
        {**records[0], "fig_uri": "9-Figure9-1.png", "s2_caption": None, "s2orc_caption": None},
        {**records[1], "fig_uri": "../../../etc/passwd"},
        {**records[2], "fig_uri": "8-Figure8-1.png", "s2_caption": None, "s2orc_caption": "Fallback from S2ORC."},
        {**records[3], "fig_uri": "7-Figure7-1.png", "oa_info": None, "radiology": None, "s2orc_references": None},
        records[4],
    ]
    with open(root / "sample.jsonl", "a", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in extra) + "\n")
        f.write("{not json\n")
    code, out, _ = run_cli("medicat", root, "-o", tmp_path / "out", "--val-fraction", "0.3", "--test-fraction", "0.3")
    assert code == 0
    manifest, samples, rejected = check_accounting(tmp_path / "out", out)
    reasons = sorted(r["reason"] for r in rejected)
    assert reasons == ["duplicate_id", "empty_caption", "malformed_record", "path_escape"]
    by_uri = {s["json"]["fig_uri"]: s for s in samples}
    assert by_uri["8-Figure8-1.png"]["txt"] == "Fallback from S2ORC."
    assert by_uri["8-Figure8-1.png"]["json"]["caption_field"] == "s2orc_caption"
    null_meta = by_uri["7-Figure7-1.png"]["json"]
    assert "modality" not in null_meta and "licence" not in null_meta and null_meta["s2orc_references"] is None
    # Figures of one paper stay in one split.
    split_of = {}
    for s in samples:
        assert split_of.setdefault(s["json"]["pdf_hash"], s["json"]["split"]) == s["json"]["split"]
    assert len(set(split_of.values())) > 1
