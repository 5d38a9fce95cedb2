"""The package as users install it: a wheel, outside this checkout, with its shipped prompt sets and catalog.

Built with pip from this tree and installed with ``--target`` into a folder that is put first on ``PYTHONPATH`` of a
process started elsewhere, so that nothing of the checkout (``configs/``, the editable install) can be what runs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from tests.evaluation.conftest import write_image_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_install_runs_zeroshot_with_a_shipped_prompt_set(tmp_path, tiny_tokenizer_dir):
    from medclip_train.config import ModelConfig
    from medclip_train.model.factory import build_model

    wheels, site, source = tmp_path / "wheels", tmp_path / "site", tmp_path / "source"
    # setuptools writes build/ and *.egg-info next to the sources: build from a copy, not in the checkout
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for name in tracked.splitlines():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)], check=True)
    (wheel,) = wheels.glob("medclip_train-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "medclip_train/evaluation/prompt_sets/medmnist_breastmnist.yaml" in names
    assert "medclip_train/evaluation/catalogs/medical.yaml" in names
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)

    cfg = ModelConfig(preset="tiny", tokenizer=str(tiny_tokenizer_dir))
    torch.manual_seed(0)
    state = {f"model.{k}": v for k, v in build_model(cfg).model.state_dict().items()}
    ckpt = tmp_path / "model.ckpt"
    torch.save({"hyper_parameters": {"clip": asdict(cfg)}, "state_dict": state}, ckpt)
    data = write_image_folder(tmp_path / "breast", ["malignant", "normal_benign"], per_class=3)

    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import medclip_train; print(medclip_train.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert where.stdout.strip().startswith(str(site)), where.stdout
    out = tmp_path / "out"
    command = ["zeroshot", "--model", str(ckpt), "--data", str(data), "--prompts", "medmnist_breastmnist"]
    result = subprocess.run(
        [sys.executable, "-m", "medclip_train.evaluation.cli", *command, "--output", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (task,) = json.loads((out / "zeroshot.json").read_text())["tasks"].values()
    assert task["n"] == 6 and task["prompts"]["templates"][0] == "a breast ultrasound image: {c}."
