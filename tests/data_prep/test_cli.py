"""The command line: clear errors, inspect."""

from __future__ import annotations

import pytest
from PIL import Image

from data_prep.cli import main
from tests.data_prep.readback import read_samples


@pytest.mark.parametrize("command", ["roco", "rocov2", "medicat", "pmc-oa", "imagefolder", "medmnist"])
def test_missing_input_is_one_clear_line(command, tmp_path, run_cli):
    missing = tmp_path / "does-not-exist"
    code, out, err = run_cli(command, missing, "-o", tmp_path / "out")
    assert code == 2 and out == ""
    assert err.startswith("medclip-prep: error:") and str(missing) in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # checked before the output folder is touched


def test_roco_folder_without_captions(tmp_path, run_cli):
    (tmp_path / "data" / "train" / "radiology").mkdir(parents=True)
    code, _, err = run_cli("roco", tmp_path, "-o", tmp_path / "out")
    assert code == 2 and "captions.txt" in err and str(tmp_path) in err


def test_bad_option_values(tmp_path, run_cli):
    (tmp_path / "f" / "c").mkdir(parents=True)
    code, _, err = run_cli("imagefolder", tmp_path / "f", "-o", tmp_path / "out", "--jpeg-quality", "0")
    assert code == 2 and "--jpeg-quality" in err
    with pytest.raises(SystemExit) as e:
        main(["roco"])  # argparse: missing arguments
    assert e.value.code == 2


def test_inspect_reports_counts_and_problems(tmp_path, run_cli):
    out = tmp_path / "demo"
    code, _, _ = run_cli("demo", "--output", out, "--n-train", "12", "--n-val", "4", "--n-test", "4",
                         "--image-size", "48", "--samples-per-shard", "5")  # fmt: skip
    assert code == 0
    code, report, _ = run_cli("inspect", out)
    assert code == 0
    assert "complete" in report and "train: 12 samples in 3 shard(s)" in report
    assert "caption length (whitespace tokens)" in report and "image longest side: <=64: 20" in report
    code, report, _ = run_cli("inspect", out, "--tokenizer", out / "tokenizer")
    assert code == 0 and "tokenizer tokens" in report
    # An interrupted run: a leftover partial shard and no sizes.json.
    (out / "sizes.json").unlink()
    (out / "train-000003.tar.tmp").write_bytes(b"partial")
    code, report, _ = run_cli("inspect", out)
    assert code == 1 and "INCOMPLETE" in report and "train-000003.tar.tmp" in report and "sizes.json" in report


def test_input_as_option_and_c_placeholder(tmp_path, run_cli):
    (tmp_path / "root" / "benign").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "root" / "benign" / "a.png")
    code, out, _ = run_cli("imagefolder", "--input", tmp_path / "root", "--output", tmp_path / "out",
                           "--template", "an ultrasound image of {c}")  # fmt: skip
    assert code == 0 and "written=1" in out
    assert read_samples(tmp_path / "out")[0]["txt"] == "an ultrasound image of benign"
    with pytest.raises(SystemExit) as e:
        main(["imagefolder", "--output", str(tmp_path / "o2")])  # no input at all
    assert e.value.code == 2
