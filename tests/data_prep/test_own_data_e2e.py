"""README's "Your own data" block, run as written: nested JSONL release -> shards and tokenizer -> token lengths ->
the tiny model trained on them -> retrieval and zero-shot with chance levels -> export -> the moved export evaluated.

The working folder holds what the block expects: ``release/`` (the nested JSONL release of test_own_data.py, built
from the real ROCOv2 and MedICaT fixture records), ``breastmnist.npz`` (the real BreastMNIST slice), and the repo's
``configs/`` and ``train.py``. Only the number of training steps is lowered (a flag appended to the train line).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data_prep.test_own_data import release  # noqa: F401  (the fixture)

REPO = Path(__file__).resolve().parents[2]
FAST = " --trainer.max_steps 6 --checkpoint.every_n_train_steps 3"


def own_data_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Your own data", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [
        line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    return [re.sub(r"\s+", " ", line).strip() for line in lines]


@pytest.mark.slow
def test_the_readme_own_data_block_runs_as_written(release, realdata, tmp_path):  # noqa: F811
    work = release["root"].parent
    shutil.copyfile(realdata / "medmnist" / "breastmnist.npz", work / "breastmnist.npz")
    shutil.copytree(REPO / "configs", work / "configs")
    shutil.copyfile(REPO / "train.py", work / "train.py")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # `python` as the user's shell finds it: this interpreter (a wrapper, as a symlink outside the venv loses it).
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["PYTHONPATH"] = str(REPO)
    commands = own_data_commands()
    assert [c.split()[0] for c in commands] == [
        "medclip-prep", "medclip-prep", "python", "medclip-eval", "medclip-prep", "medclip-eval", "medclip-export",
        "mv", "medclip-eval",
    ]  # fmt: skip
    outputs = []
    for command in commands:
        if command.startswith("python train.py"):
            command += FAST
        proc = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout + proc.stderr)

    assert (work / "shards/mine/tokenizer/tokenizer.json").is_file()
    assert re.search(r"longer than context 64: [\d.]+%", outputs[1]), outputs[1]
    summary = json.loads((work / "checkpoints/mine/summary.json").read_text())
    assert summary["steps"] == 6 and summary["checkpoint"]["step"] == 6
    # The moved export gives the figures of the checkpoint it came from.
    ckpt, moved = (
        json.loads(next((work / "eval" / name).glob("retrieval*.json")).read_text()) for name in ("mine", "moved")
    )
    recalls = {k: v for k, v in _metrics(ckpt).items() if "recall" in k.lower() or "r@" in k.lower()}
    assert recalls, sorted(_metrics(ckpt))
    assert recalls == pytest.approx({k: _metrics(moved)[k] for k in recalls}, abs=1e-6)
    assert "chance" in outputs[3] and "chance" in outputs[5]
    assert not (work / "exported/mine").exists() and (work / "moved-mine/open_clip_config.json").is_file()


def _metrics(result) -> dict:
    """The numeric leaves of an evaluation result, by path."""
    out = {}

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}/{k}")
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            out[path] = float(node)

    walk(result, "")
    return out
