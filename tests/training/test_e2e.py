"""End to end: ``train.py fit`` on generated shards writes a complete run folder and the model learns."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

from medclip_train.config import ModelConfig, OptimConfig
from medclip_train.data.datamodule import WebDataModule
from medclip_train.model.loading import read_project_checkpoint
from medclip_train.module import CLIPModule
from tests.shardkit import make_shards, shard_pattern

REPO = Path(__file__).resolve().parents[2]


def run_train(args: list[str], cwd: Path = REPO, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), "fit", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def fixed_batch_loss(module: CLIPModule, batch: dict) -> float:
    module.eval()
    with torch.no_grad():
        out = module.model(module.images(batch), batch["text"])
        return float(module.loss(out)["loss"])


def test_train_fit_writes_run_folder_and_loss_goes_down(tmp_path, tiny_tokenizer_dir):
    shards = make_shards(tmp_path / "shards", [8, 8], image_size=64)
    run_dir = tmp_path / "run"
    steps = 30
    result = run_train(
        [
            "--config",
            str(REPO / "configs/test_tiny.yaml"),
            "--model.clip.tokenizer",
            str(tiny_tokenizer_dir),
            "--data.train",
            json.dumps([{"shards": shard_pattern(shards)}]),
            "--data.batch_size",
            "8",
            "--model.optim.lr",
            "1e-3",
            "--model.optim.schedule",
            "constant",
            "--trainer.max_steps",
            str(steps),
            "--trainer.default_root_dir",
            str(run_dir),
            "--checkpoint.every_n_train_steps",
            "15",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("config.yaml", "last.ckpt", "metrics.csv", "summary.json", "step0000015.ckpt"):
        assert (run_dir / name).is_file(), f"{name} missing in the run folder"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps
    assert summary["samples_seen"] == steps * 8
    for key in ("wall_s", "steady_samples_per_s", "peak_rss_mb", "final_loss", "eval"):
        assert key in summary
    assert summary["steady_samples_per_s"] > 0
    with open(run_dir / "metrics.csv") as f:
        logged = [row for row in csv.DictReader(f) if row.get("train/loss")]
    assert len(logged) == steps

    # The same initial weights as the run (LightningCLI seeds with seed_everything: 0 before building the model).
    L.seed_everything(0)
    module = CLIPModule(ModelConfig(preset="tiny", tokenizer=str(tiny_tokenizer_dir)), optim=OptimConfig(lr=2e-3))
    # The fixed batch comes through the eval transform (centre crop): no random crop, so it does not depend on how
    # much of the global RNG earlier tests in this process consumed.
    dm = WebDataModule(val=shard_pattern(shards), batch_size=16, num_workers=0)
    dm.connect(module.tokenizer, module.preprocess_cfg)
    batch = next(iter(dm.val_dataloader()))
    before = fixed_batch_loss(module, batch)
    ckpt = read_project_checkpoint(run_dir / "last.ckpt")
    assert ckpt["global_step"] == steps, "last.ckpt must hold the final weights, not the last periodic save"
    module.load_state_dict(ckpt["state_dict"])
    after = fixed_batch_loss(module, batch)
    assert after < before * 0.8, (before, after)
