"""Shards and checkpoints in S3, against a real S3 server on 127.0.0.1 (moto's server mode, ``tests/s3server.py``)."""

from __future__ import annotations

import shutil

import pytest

from tests.s3server import ACCESS_KEY, SECRET_KEY, local_s3, upload_folder
from tests.shardkit import make_shards
from tests.training.conftest import KeyRecorder, callback_arg, fit_args, read_keys, read_summary, train_py


@pytest.fixture
def s3(monkeypatch):
    yield from local_s3(monkeypatch)


def assert_no_credentials(text: str) -> None:
    assert SECRET_KEY not in text and ACCESS_KEY not in text, "credentials printed"


@pytest.mark.slow
def test_exact_epoch_over_s3_shards(s3, tok, tmp_path):
    """``train.py fit`` on ``s3://`` shards: sizes.json read from the bucket, every sample once in the epoch."""
    make_shards(tmp_path / "roco", [9, 7], image_size=64)
    upload_folder(s3.fs, tmp_path / "roco", f"{s3.bucket}/roco")
    shutil.rmtree(tmp_path / "roco")  # read from the bucket only
    pattern = f"s3://{s3.bucket}/roco/train-{{000000..000001}}.tar"
    root = tmp_path / "run"
    # 16 samples, batches of 4 from 2 loader workers: 4 steps are one exact epoch.
    args = fit_args(
        tok, pattern, root, "--data.batch_size", "4", "--data.num_workers", "2", "--trainer.max_steps", "4",
        "--trainer.callbacks+", callback_arg(KeyRecorder),
    )  # fmt: skip
    proc = train_py(args)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    keys = [k for record in read_keys(root) for k in record["keys"]]
    assert sorted(keys) == [f"train_{i:06d}" for i in range(16)], "one exact epoch: every sample once, none twice"
    summary = read_summary(root)
    assert summary["samples_seen"] == 16 and summary["skipped_samples"] == 0
    assert_no_credentials(out + err)
