"""What ``--help`` says a converter's defaults are is what its manifest records when the flags are left out."""

from __future__ import annotations

import csv
import json
import re

import pytest
from PIL import Image

from data_prep.cli import main

# Output options that the manifest records (converter.options), with how their help text prints the default.
RECORDED = {"--samples-per-shard": "samples_per_shard", "--jpeg-quality": "jpeg_quality", "--seed": "seed"}


def help_defaults(command: str, capsys) -> dict[str, int]:
    """``{dest: default}`` read from ``medclip-prep COMMAND --help`` (the text a user reads, not the parser)."""
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps help lines at the terminal width
    found = {}
    for flag, dest in RECORDED.items():
        # "--samples-per-shard SAMPLES_PER_SHARD samples per tar shard (default 5000)"
        match = re.search(rf"{flag} {dest.upper()} [^()]*\(default:? (-?\d+)\)", text)
        assert match, f"{command} --help does not state the default of {flag}"
        found[dest] = int(match.group(1))
    return found


def tiny_input(command: str, tmp_path) -> list[str]:
    """The smallest input each converter accepts, as command-line arguments after the command."""
    root = tmp_path / "folder"
    (root / "cls").mkdir(parents=True)
    Image.new("RGB", (12, 10), (10, 200, 30)).save(root / "cls" / "a.png")
    if command == "imagefolder":
        return [str(root)]
    if command == "csv":
        with open(tmp_path / "t.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([["path", "text"], ["cls/a.png", "A caption."]])
        return [str(tmp_path / "t.csv"), "--images", str(root), "--image-column", "path", "--caption-column", "text"]
    if command == "demo":
        return ["--n-train", "2", "--n-val", "1", "--n-test", "1", "--image-size", "32"]
    raise AssertionError(command)


@pytest.mark.parametrize("command", ["imagefolder", "csv", "demo"])
def test_manifest_records_the_defaults_that_help_states(command, tmp_path, capsys):
    stated = help_defaults(command, capsys)
    out = tmp_path / "out"
    assert main([command, *tiny_input(command, tmp_path), "--output", str(out), "--quiet"]) == 0
    recorded = json.loads((out / "manifest.json").read_text(encoding="utf-8"))["converter"]["options"]
    assert {dest: recorded[dest] for dest in stated} == stated


def test_real_data_converters_use_the_real_data_defaults(capsys):
    """The demo's smaller shards are its own: every other converter states (and so records) 5000 and 95."""
    for command in ("roco", "rocov2", "medicat", "pmc-oa", "csv", "jsonl", "imagefolder", "medmnist"):
        assert help_defaults(command, capsys)["samples_per_shard"] == 5000
        assert help_defaults(command, capsys)["jpeg_quality"] == 95
    assert help_defaults("demo", capsys)["samples_per_shard"] == 500
