"""wandb when configured: without credentials the run logs offline instead of waiting for a login."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.shardkit import make_shards, shard_pattern
from tests.training.test_e2e import REPO


def test_wandb_logger_without_credentials_runs_offline(tmp_path, tiny_tokenizer_dir):
    shards = make_shards(tmp_path / "shards", [8], image_size=64)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update({"HOME": str(tmp_path), "PYTHONPATH": str(REPO)})  # no ~/.netrc, no API key
    args = [
        sys.executable,
        str(REPO / "train.py"),
        "fit",
        "--config",
        str(REPO / "configs/test_tiny.yaml"),
        "--model.clip.tokenizer",
        str(tiny_tokenizer_dir),
        "--data.train",
        json.dumps([{"shards": shard_pattern(shards)}]),
        "--trainer.max_steps",
        "2",
        "--trainer.default_root_dir",
        str(tmp_path / "run"),
        "--trainer.logger",
        "lightning.pytorch.loggers.WandbLogger",
        "--trainer.logger.save_dir",
        str(tmp_path / "run"),
    ]
    result = subprocess.run(
        args, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "logging offline" in result.stderr
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "wandb wrote no offline run"
