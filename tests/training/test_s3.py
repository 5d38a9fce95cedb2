"""Shards and checkpoints in S3, against a real S3 server on 127.0.0.1 (moto's server mode, ``tests/s3server.py``)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from medclip_train.remote import RemoteRunDir
from tests.s3server import ACCESS_KEY, SECRET_KEY, local_s3, upload_folder
from tests.shardkit import make_shards, shard_pattern
from tests.training.conftest import (
    KeyRecorder,
    SendSigterm,
    callback_arg,
    fit_args,
    read_keys,
    read_summary,
    run_cli,
    sigkill,
    train_py,
)
from tests.training.test_remote_shards import keys, make_dm, read_epoch


@pytest.fixture
def s3(monkeypatch):
    yield from local_s3(monkeypatch)


def test_exact_epoch_over_s3_two_ranks_two_workers_matches_local_read(s3, tokenizer, tmp_path):
    """The data module on ``s3://`` shards, each of 2 ranks with 2 loader workers (processes that open their own
    S3 connections): the plan and order of the same shards read locally, every sample of the epoch once."""
    sizes = [7, 3, 11, 5]
    paths = make_shards(tmp_path / "roco", sizes)
    upload_folder(s3.fs, tmp_path / "roco", f"{s3.bucket}/roco")
    remote = make_dm(tokenizer, f"s3://{s3.bucket}/roco/train-{{000000..000003}}.tar", num_workers=2)
    local = make_dm(tokenizer, shard_pattern(paths), num_workers=2)
    assert remote._train_sizes == sizes, "sizes.json read from the bucket"
    per_rank = []
    for rank in range(2):
        per_rank.append(keys(read_epoch(remote, rank, 2)))
        assert per_rank[-1] == keys(read_epoch(local, rank, 2)), "same plan, same order as the local shards"
    assert sorted(per_rank[0] + per_rank[1]) == [f"train_{i:06d}" for i in range(sum(sizes))]


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


# ---- remote checkpoints ----------------------------------------------------------------------------------------------
# 16 samples, batches of 4: 4 steps are one exact epoch; crops are the whole (square) image, so that nothing random
# lies outside the checkpoint and a resumed run ends with the uninterrupted run's weights.
RUN = [
    *"--data.batch_size 4 --trainer.max_steps 4 --checkpoint.every_n_train_steps 2".split(),
    *("--data.train_scale", "[1.0, 1.0]"),
]


def remote_json(s3, name: str, run: str = "runs/a") -> dict:
    return json.loads(s3.fs.cat_file(f"{s3.bucket}/{run}/{name}"))


def model_state(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_run_resumes_from_the_remote_checkpoint_after_its_folder_is_lost(s3, tok, shards, tmp_path, capfd):
    pattern = shards([8, 8])
    remote = ["--checkpoint.remote_dir", f"s3://{s3.bucket}/runs/a"]
    run_cli(fit_args(tok, pattern, tmp_path / "reference", *RUN))

    root = tmp_path / "run"
    stop = ("--trainer.callbacks+", callback_arg(SendSigterm, at_step=2))
    with pytest.raises(SystemExit):  # preempted after step 2: last.ckpt saved and uploaded
        run_cli(fit_args(tok, pattern, root, *RUN, *remote, *stop))
    manifest = remote_json(s3, "latest.json")
    assert manifest["step"] == 2 and manifest["previous"] == []
    stored = s3.fs.cat_file(f"{s3.bucket}/runs/a/{manifest['key']}")
    assert len(stored) == manifest["size"] and hashlib.sha256(stored).hexdigest() == manifest["sha256"]
    assert remote_json(s3, "summary.json")["steps"] == 2, "summary.json synced at the end of the run"
    assert s3.fs.exists(f"{s3.bucket}/runs/a/metrics.csv") and s3.fs.exists(f"{s3.bucket}/runs/a/config.yaml")

    shutil.rmtree(root)  # the node is gone: only the bucket has the run
    run_cli(fit_args(tok, pattern, root, *RUN, *remote, "--ckpt_path", "last"))
    assert read_summary(root)["steps_this_run"] == 2, "resumed at step 2"
    reference, resumed = model_state(tmp_path / "reference" / "last.ckpt"), model_state(root / "last.ckpt")
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference), "the same final weights"

    manifest = remote_json(s3, "latest.json")
    assert manifest["step"] == 4 and [e["step"] for e in manifest["previous"]] == [2]
    assert remote_json(s3, "summary.json")["steps"] == 4
    # The first part's metrics came back from the bucket and were kept aside, as a local resume does.
    earlier = s3.fs.cat_file(f"{s3.bucket}/runs/a/metrics.part1.csv").decode()
    assert earlier.count("\n") > 1
    out, err = capfd.readouterr()
    assert_no_credentials(out + err)


@pytest.mark.slow
def test_upload_killed_midway_leaves_the_previous_checkpoint_as_last(s3, tok, tmp_path):
    """SIGKILL while the step-4 checkpoint is being uploaded: latest.json still names step 2, complete."""
    make_shards(tmp_path / "shards", [12, 12], image_size=64)
    pattern = str(tmp_path / "shards" / "train-{000000..000001}.tar")
    s3.slow.pattern, s3.slow.delay_s = "/runs/b/step0000004-", 120.0  # the upload hangs until the kill
    root = tmp_path / "run"
    args = [*RUN, "--trainer.max_steps", "6", "--checkpoint.remote_dir", f"s3://{s3.bucket}/runs/b"]
    proc = train_py(fit_args(tok, pattern, root, *args), log=tmp_path / "killed.log")
    try:
        assert s3.slow.started.wait(timeout=240), (tmp_path / "killed.log").read_text()[-3000:]
    finally:
        sigkill(proc)
    assert (root / "step0000004.ckpt").exists(), "killed after the local save, during the upload"
    s3.fs.invalidate_cache()
    assert remote_json(s3, "latest.json", "runs/b")["step"] == 2
    assert not s3.fs.glob(f"{s3.bucket}/runs/b/step0000004-*"), "no object of the interrupted upload"

    fetched = RemoteRunDir(f"s3://{s3.bucket}/runs/b").fetch_latest(str(tmp_path / "fresh"))
    assert torch.load(fetched, map_location="cpu", weights_only=True)["global_step"] == 2


def test_last_skips_a_damaged_object_for_the_previous_complete_one(s3, tmp_path, capsys):
    """An object that does not match latest.json (cut short, or other bytes of the same size) is never resumed."""
    remote = RemoteRunDir(f"s3://{s3.bucket}/runs/c")
    assert remote.fetch_latest(str(tmp_path / "empty")) is None, "no manifest: nothing to resume"
    written = {}
    for step in (2, 4):
        path = tmp_path / f"step{step}.ckpt"
        path.write_bytes(os.urandom(1000 + step))
        written[step] = remote.upload_checkpoint(str(path), step)
    latest = f"{s3.bucket}/runs/c/{written[4]['key']}"
    assert remote.fetch_latest(str(tmp_path / "local"), local_step=4) is None, "the local checkpoint is as new"

    s3.fs.pipe_file(latest, (tmp_path / "step4.ckpt").read_bytes()[:500])  # a partial object under the final key
    got = remote.fetch_latest(str(tmp_path / "local"))
    assert Path(got).read_bytes() == (tmp_path / "step2.ckpt").read_bytes()
    assert f"{written[4]['key']} has 500 bytes, latest.json says 1004" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "local")) == [written[2]["key"]], "no temporary file left"

    shutil.rmtree(tmp_path / "local")
    s3.fs.pipe_file(f"{s3.bucket}/runs/c/{written[2]['key']}", os.urandom(1002))  # same size, other bytes
    with pytest.raises(FileNotFoundError, match=r"runs/c/latest\.json: no complete checkpoint among its 2 entries"):
        remote.fetch_latest(str(tmp_path / "local"))
    assert os.listdir(tmp_path / "local") == [], "a download that fails its sha256 is removed"
