"""Exit codes scripts can rely on: a conversion that writes nothing fails, with the main reason in one line."""

from __future__ import annotations

import json

from tests.data_prep.conftest import jpeg_bytes
from tests.data_prep.readback import check_accounting, summary_counts


def test_every_record_rejected_exits_non_zero_naming_the_main_reason(tmp_path, run_cli):
    images = tmp_path / "images"
    images.mkdir()
    (images / "only.jpg").write_bytes(jpeg_bytes())
    table = tmp_path / "t.csv"
    rows = ["missing1.jpg,A caption.", "missing2.jpg,Another caption.", "only.jpg,", "missing3.jpg,Third one."]
    table.write_text("path,text\n" + "\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    code, stdout, err = run_cli("csv", table, "-o", out, "--images", images, "--image-column", "path",
                                "--caption-column", "text")  # fmt: skip
    assert code == 1
    assert summary_counts(stdout) == {"written": 0, "rejected": 4, "read": 4}
    assert err.count("\n") == 1 and err.startswith("medclip-prep: error: nothing written")
    assert "missing_image (3 of 4)" in err and "--images" in err and str(out / "rejected.jsonl") in err
    manifest, _, rejected = check_accounting(out, stdout)  # the evidence stays for the user to read
    assert manifest["rejected"] == {"empty_caption": 1, "missing_image": 3} and len(rejected) == 4


def test_an_empty_input_exits_non_zero(tmp_path, run_cli):
    table = tmp_path / "t.jsonl"
    table.write_text("\n", encoding="utf-8")
    code, stdout, err = run_cli("jsonl", table, "-o", tmp_path / "out", "--image-column", "path",
                                "--caption-column", "text")  # fmt: skip
    assert code == 1 and summary_counts(stdout) == {"written": 0, "rejected": 0, "read": 0}
    assert err.count("\n") == 1 and "nothing written" in err and "no records" in err
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["read"] == 0
