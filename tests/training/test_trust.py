"""Artefacts a user can trust: a resume that cannot silently shift the data, one run per folder, no endless epoch
of bad samples, no stale temporary files, and one-line errors that name the option."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import lightning as L
import pytest
import torch

from tests.shardkit import make_shards, shard_pattern
from tests.training.conftest import (
    KeyRecorder,
    WaitForFile,
    callback_arg,
    fit_args,
    read_keys,
    read_metrics,
    read_summary,
    run_cli,
    train_py,
)

B4 = ("--data.batch_size", "4")


def cli_error(capsys, args) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stop:
        run_cli(args)
    return stop.value.code, capsys.readouterr().err.strip()


# ---- resume -------------------------------------------------------------------------------------------------------
def test_resume_with_another_batch_size_and_workers_mid_epoch_finishes_the_epoch_exactly(tmp_path, shards, tok):
    """Elastic resume: 3 steps of 4 on 2 workers, then the rest of the epoch in batches of 8 on 1 worker. Every
    sample of the epoch is trained on once (this resume used to be refused; counted in batches of 8 the position
    would have skipped 12 samples)."""
    pattern = shards([16, 16])  # 32 samples, batch 4: 8 steps an epoch; 3 steps stop in its middle
    root = tmp_path / "run"
    keys = ("--trainer.callbacks+", callback_arg(KeyRecorder))
    run_cli(fit_args(tok, pattern, root, "--trainer.max_steps", "3", *B4, "--data.num_workers", "2", *keys))
    # 20 samples left: batches of 8, 8 and 4, then the epoch ends (step 7 would start epoch 1).
    more = ["--trainer.max_steps", "7", "--data.batch_size", "8", "--data.num_workers", "1", *keys, "--ckpt_path=last"]
    run_cli(fit_args(tok, pattern, root, *more))
    records = read_keys(root)
    first_epoch = [k for r in records if r["step"] <= 6 for k in r["keys"]]
    assert [len(r["keys"]) for r in records] == [4, 4, 4, 8, 8, 4, 8]
    assert sorted(first_epoch) == [f"train_{i:06d}" for i in range(32)], "every sample of epoch 0 once, none twice"
    state = torch.load(root / "last.ckpt", weights_only=True)["WebDataModule"]
    assert (state["epoch"], state["batches_in_epoch"], state["parts"]) == (1, 1, []), "epoch 1 starts afresh"


def test_resume_with_another_tokenizer_is_refused_unless_allowed(tmp_path, shards, tok, capsys):
    pattern = shards([16, 16])
    root = tmp_path / "run"
    run_cli(fit_args(tok, pattern, root, "--trainer.max_steps", "2", "--data.batch_size", "4"))
    other = tmp_path / "other_tokenizer"
    other.symlink_to(tok, target_is_directory=True)  # the same files under another name: still another setting
    args = fit_args(other, pattern, root, "--trainer.max_steps", "4", "--data.batch_size", "4", "--ckpt_path", "last")
    capsys.readouterr()
    code, err = cli_error(capsys, args)
    assert code == 2 and len(err.splitlines()) == 1 and "model.clip.tokenizer" in err, err
    run_cli([*args, "--resume_allow_changed", "[model.clip.tokenizer]"])
    assert read_summary(root)["steps"] == 4
    assert "resuming with a changed setting" in capsys.readouterr().err


def test_resume_with_another_shard_list_is_refused(tmp_path, shards, tok, capsys):
    root = tmp_path / "run"
    run_cli(fit_args(tok, shards([8, 8]), root, "--trainer.max_steps", "2", "--data.batch_size", "4"))
    capsys.readouterr()
    code, err = cli_error(
        capsys, fit_args(tok, shards([8, 8]), root, "--trainer.max_steps", "4", *B4, "--ckpt_path", "last")
    )
    assert code == 2 and "data.train" in err, err


def test_resume_of_a_finished_run_says_so_and_touches_nothing(tmp_path, shards, tok, capsys):
    pattern = shards([8, 8])
    root = tmp_path / "run"
    run_cli(fit_args(tok, pattern, root, "--trainer.max_steps", "2", "--data.batch_size", "4"))
    files = {p.name: p.stat().st_mtime_ns for p in root.iterdir()}
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_cli(
            fit_args(tok, pattern, root, "--trainer.max_steps", "2", "--data.batch_size", "4", "--ckpt_path", "last")
        )
    assert stop.value.code == 0
    assert "already finished at step 2" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in root.iterdir()} == files


def test_max_steps_zero_is_a_one_line_config_error(tmp_path, shards, tok, capsys):
    code, err = cli_error(capsys, fit_args(tok, shards([8]), tmp_path / "run", "--trainer.max_steps", "0"))
    assert code == 2 and err.startswith("error: trainer.max_steps") and len(err.splitlines()) == 1, err


# ---- parser errors ------------------------------------------------------------------------------------------------
def test_a_wrong_type_is_one_line_naming_key_value_and_type(tmp_path, shards, tok, capsys):
    code, err = cli_error(capsys, fit_args(tok, shards([8]), tmp_path / "run", "--model.optim.lr", "fast"))
    assert code == 2
    assert err == "error: --model.optim.lr: expected float, got 'fast'"


def test_an_abbreviated_option_is_refused_with_the_nearest_real_one(tmp_path, shards, tok, capsys):
    root = tmp_path / "run"
    code, err = cli_error(capsys, fit_args(tok, shards([8]), root, "--trainer.max_step", "30"))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--trainer.max_step" in err and "did you mean --trainer.max_steps?" in err
    assert not (root / "last.ckpt").exists(), "the typo must not start a run"


# ---- run folder ---------------------------------------------------------------------------------------------------
def test_a_second_run_in_the_same_folder_stops_at_once_and_the_first_is_unharmed(tmp_path, shards, tok, capsys):
    pattern = shards([16, 16])
    root = tmp_path / "run"
    # The first run holds after its first step until the test lets it go: with a fixed delay per step instead, a
    # loaded machine (two test workers on two cores) let it finish before the second run reached the lock.
    release = tmp_path / "release"
    hold = ("--trainer.callbacks+", callback_arg(WaitForFile, path=str(release), at_step=1))
    first = train_py(
        fit_args(tok, pattern, root, "--trainer.max_steps", "8", "--data.batch_size", "4", *hold),
        log=tmp_path / "first.log",
    )
    try:
        deadline = time.monotonic() + 120
        started = (root / "config.yaml", root / ".run.lock")
        while not all(p.exists() for p in started) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
        config_before = (root / "config.yaml").read_text()
        code, err = cli_error(capsys, fit_args(tok, pattern, root, "--trainer.max_steps", "3"))
        assert code == 2 and "another run is using this run folder" in err and f"PID {first.pid}" in err, err
        assert (root / "config.yaml").read_text() == config_before
        release.touch()
        assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert [int(r["step"]) for r in read_metrics(root)] == list(range(8))
    assert not (root / ".run.lock").exists(), "the lock is released at the end of the run"


def test_the_lock_of_a_dead_run_is_taken_over_with_a_warning(tmp_path, shards, tok, capsys):
    root = tmp_path / "run"
    root.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (root / ".run.lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    run_cli(fit_args(tok, shards([8]), root, "--trainer.max_steps", "1", "--data.batch_size", "4"))
    assert "taking over the lock of a run that is no longer alive" in capsys.readouterr().err
    assert read_summary(root)["steps"] == 1


def test_stale_checkpoint_temporaries_are_removed_and_nothing_else(tmp_path, shards, tok):
    root = tmp_path / "run"
    root.mkdir()
    stale = root / ".step0000002.ckpt.x7ab_3.tmp"  # the name AtomicCheckpointIO gives, left by a kill -9
    stale.write_bytes(b"half a checkpoint")
    mine = root / ".notes.tmp"
    mine.write_text("a user's file")
    run_cli(fit_args(tok, shards([8]), root, "--trainer.max_steps", "1", "--data.batch_size", "4"))
    assert not stale.exists()
    assert mine.read_text() == "a user's file"


def test_a_rank_other_than_zero_moves_no_metrics_and_takes_no_lock(tmp_path, shards, tok, monkeypatch):
    """Lightning's DDP launcher re-runs the command for each local rank with LOCAL_RANK set: each rank used to move
    metrics.csv aside on resume (a race with rank zero's logger) and would now also take the folder's lock."""
    pattern = shards([16, 16])
    root = tmp_path / "run"
    run_cli(fit_args(tok, pattern, root, "--trainer.max_steps", "2", "--data.batch_size", "4"))
    from medclip_train.cli import MedCLIPCLI, cli_main

    monkeypatch.setenv("LOCAL_RANK", "1")
    args = fit_args(tok, pattern, root, "--trainer.max_steps", "4", "--data.batch_size", "4", "--ckpt_path", "last")
    calls = []
    # Only the set-up before the model is built runs: that is where the folder is prepared.
    monkeypatch.setattr(MedCLIPCLI, "instantiate_classes", lambda self: calls.append(self.config))
    monkeypatch.setattr(MedCLIPCLI, "_run_subcommand", lambda self, subcommand: None)
    cli_main(args)
    assert calls, "the CLI got to building the classes"
    assert (root / "metrics.csv").exists() and not (root / "metrics.part1.csv").exists()
    assert not (root / ".run.lock").exists()


# ---- data that cannot train -----------------------------------------------------------------------------------------
def _bad_dataset(tmp_path, kind: str) -> str:
    folder = tmp_path / kind
    if kind == "text_named_tar":
        folder.mkdir()
        (folder / "train-000000.tar").write_text("this is not a tar file\n" * 10)
        (folder / "sizes.json").write_text(json.dumps({"train-000000.tar": 12}))
        return str(folder / "train-000000.tar")
    paths = make_shards(folder, [12], image_size=32, corrupt={i: "no_text" for i in range(12)})
    return shard_pattern(paths)


@pytest.mark.parametrize("kind", ["text_named_tar", "images_without_captions"])
def test_a_dataset_of_only_bad_samples_stops_with_the_shard_named(tmp_path, tok, kind):
    pattern = _bad_dataset(tmp_path, kind)
    proc = train_py(fit_args(tok, pattern, tmp_path / "run", "--trainer.max_steps", "1000", "--data.batch_size", "4"))
    try:
        out, err = proc.communicate(timeout=240)  # it used to start a new empty epoch forever
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("a dataset of bad samples made the run hang")
    assert proc.returncode != 0
    assert "DataError" in err and "train-000000.tar" in err, err[-2000:]
    last = tmp_path / "run" / "last.ckpt"
    assert not last.exists() or torch.load(last, weights_only=True)["WebDataModule"]["epoch"] < 2


class SendSignal(L.Callback):
    """Sends ``signum`` to this process after ``at_step`` steps, as SLURM's ``--signal=USR1@120`` does."""

    def __init__(self, at_step: int, signum: int):
        self.at_step, self.signum = at_step, signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), self.signum)


def test_slurm_warning_signal_saves_stops_and_requeues_the_job(tmp_path, shards, tok, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    scontrol = bin_dir / "scontrol"  # SLURM's command, standing in for the cluster: it records what it was asked
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    root = tmp_path / "run"
    usr1 = callback_arg(SendSignal, at_step=3, signum=int(signal.SIGUSR1))
    with pytest.raises(SystemExit) as stop:
        run_cli(fit_args(tok, shards([16, 16]), root, "--trainer.max_steps", "8", *B4, "--trainer.callbacks+", usr1))
    assert stop.value.code == 128 + signal.SIGUSR1
    assert torch.load(root / "last.ckpt", weights_only=True)["global_step"] == 3
    assert read_summary(root)["stopped_by"] == "SIGUSR1"
    assert calls.read_text().split() == ["requeue", "4242"]


def test_a_run_that_ended_at_an_epoch_end_resumes_into_the_next_epoch(tmp_path, shards, tok):
    """4 steps of 4 samples are exactly one epoch of 16: last.ckpt is written after Lightning's epoch end. The resumed
    run used to find an empty 'rest of the epoch' and stop with DataError (or skip the next epoch)."""
    pattern = shards([8, 8])
    root = tmp_path / "run"
    keys = ("--trainer.callbacks+", callback_arg(KeyRecorder))
    run_cli(fit_args(tok, pattern, root, "--trainer.max_steps", "4", *B4, *keys))
    run_cli(fit_args(tok, pattern, root, "--trainer.max_steps", "8", *B4, *keys, "--ckpt_path", "last"))
    records = read_keys(root)
    assert [r["step"] for r in records] == list(range(1, 9))
    epochs = [[k for r in records[i : i + 4] for k in r["keys"]] for i in (0, 4)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == [f"train_{i:06d}" for i in range(16)]
    assert epochs[0] != epochs[1], "the second epoch is reshuffled, not replayed"


def test_batch_size_may_change_when_the_checkpoint_closed_an_epoch(tmp_path, shards, tok, capsys):
    """A periodic checkpoint at an epoch's last step holds the whole epoch as consumed (4 of 4 batches): that is an
    epoch boundary, where another batch size is accepted (it was refused as 'in the middle of epoch 0')."""
    pattern = shards([8, 8])
    root = tmp_path / "run"
    keys = ("--trainer.callbacks+", callback_arg(KeyRecorder))
    run_cli(
        fit_args(tok, pattern, root, "--trainer.max_steps", "4", *B4, "--checkpoint.every_n_train_steps", "4", *keys)
    )
    assert torch.load(root / "last.ckpt", weights_only=True)["WebDataModule"]["batches_in_epoch"] == 4
    args = ["--trainer.max_steps", "6", "--data.batch_size", "8", *keys, "--ckpt_path", "last"]
    run_cli(fit_args(tok, pattern, root, *args))
    second_epoch = [k for r in read_keys(root) if r["step"] > 4 for k in r["keys"]]
    assert sorted(second_epoch) == [f"train_{i:06d}" for i in range(16)]


def test_training_reports_once_the_share_of_captions_cut_by_the_context(tmp_path, shards, tok, capsys):
    """The test captions are 8-10 words: at a context of 6 tokens ([CLS], 4 words, [SEP]) every one is cut, and
    the run says so once, with the command that shows their lengths."""
    root = tmp_path / "run"
    args = ["--trainer.max_steps", "2", *B4, "--model.clip.context_length", "6"]
    run_cli(fit_args(tok, shards([8]), root, *args))
    out = capsys.readouterr().out
    assert out.count("training captions reach the text context (6 tokens) and are cut") == 1, out
    assert "100.0% of the first 8" in out and "medclip-prep inspect" in out
    run_cli(fit_args(tok, shards([8]), tmp_path / "run2", "--trainer.max_steps", "2", *B4))
    assert "0.0% of the first 8 training captions" in capsys.readouterr().out
