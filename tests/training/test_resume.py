"""A run killed with SIGKILL resumes from ``last.ckpt``: step counter, schedule and data stream all continue."""

from __future__ import annotations

import csv
import signal
import time

import pytest
import torch

from medclip_train.config import OptimConfig
from medclip_train.model.loading import read_project_checkpoint
from medclip_train.optim import lr_lambda
from tests.training.conftest import (
    KeyRecorder,
    SendSigterm,
    SlowDown,
    callback_arg,
    fit_args,
    read_keys,
    read_metrics,
    read_summary,
    run_cli,
    sigkill,
    train_py,
)

MAX_STEPS, EVERY, BATCH, LR, WARMUP = 12, 3, 4, 1e-3, 2


def _logged_steps(root) -> set[int]:
    try:
        return {int(row["step"]) for row in read_metrics(root, "train/lr")}
    except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
        return set()


def wait_for_checkpoint(proc, root, timeout_s: float = 180.0) -> None:
    """Until the first step checkpoint and ``last.ckpt`` are on disk (both are written whole, then renamed) and the
    metrics row of that step too: Lightning logs a step's row after its checkpoint callbacks, so a kill right after
    the files appear could land before the row is written (it did under CI load), and the test could not tell that
    loss from one of ours."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (root / f"step{EVERY:07d}.ckpt").exists() and (root / "last.ckpt").exists():
            if EVERY - 1 in _logged_steps(root):
                return
        if proc.poll() is not None:
            pytest.fail(
                f"the run ended before its first checkpoint:\n{(root.parent / 'killed.log').read_text()[-3000:]}"
            )
        time.sleep(0.05)
    proc.kill()
    pytest.fail("no checkpoint within the time limit")


def test_sigkill_then_resume_finishes_the_planned_run(tmp_path, shards, tok):
    pattern = shards([24, 24])  # 48 samples, batch 4: the 12 steps are one exact epoch
    root = tmp_path / "run"
    common = [
        *f"--trainer.max_steps {MAX_STEPS} --checkpoint.every_n_train_steps {EVERY} --data.batch_size {BATCH}".split(),
        *f"--model.optim.lr {LR} --model.optim.warmup_steps {WARMUP}".split(),
        *("--trainer.callbacks+", callback_arg(KeyRecorder)),
    ]
    # Each step sleeps, so there is time to kill the run after its first checkpoint and well before its end.
    slow = ("--trainer.callbacks+", callback_arg(SlowDown, delay_s=0.5))
    proc = train_py(fit_args(tok, pattern, root, *common, *slow), log=tmp_path / "killed.log")
    try:
        wait_for_checkpoint(proc, root)
    finally:
        sigkill(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not (root / "summary.json").exists(), "the run finished before it was killed"

    ckpt = torch.load(root / "last.ckpt", map_location="cpu", weights_only=True)
    resumed_from = ckpt["global_step"]
    assert EVERY <= resumed_from < MAX_STEPS and resumed_from % EVERY == 0
    data_state = ckpt["WebDataModule"]
    assert data_state["epoch"] == 0 and data_state["batches_in_epoch"] == resumed_from
    first_run = read_keys(root)
    (root / "keys-rank0.jsonl").rename(root / "keys-killed.jsonl")

    run_cli(fit_args(tok, pattern, root, *common, "--ckpt_path", "last"))

    summary = read_summary(root)
    assert summary["steps"] == MAX_STEPS
    assert summary["steps_this_run"] == MAX_STEPS - resumed_from
    assert summary["samples_seen"] == MAX_STEPS * BATCH, "samples_seen is a checkpointed buffer: it continues"

    # The schedule continues: the LR of the first resumed step is the schedule's value at that step.
    rows = read_metrics(root, "train/lr")
    assert int(rows[0]["step"]) == resumed_from
    expected = LR * lr_lambda(OptimConfig(lr=LR, warmup_steps=WARMUP), MAX_STEPS)(resumed_from)
    assert float(rows[0]["train/lr"]) == pytest.approx(expected, rel=1e-6)
    assert len(rows) == MAX_STEPS - resumed_from
    # Nothing lost: the killed part's metrics were moved aside, not overwritten.
    with open(root / "metrics.part1.csv", newline="") as f:
        earlier = [row for row in csv.DictReader(f) if row.get("train/lr")]
    assert [int(r["step"]) for r in earlier][:resumed_from] == list(range(resumed_from))

    # The stream continues: the resumed run trains on exactly the samples of the epoch not yet trained on.
    consumed = [k for rec in first_run if rec["step"] <= resumed_from for k in rec["keys"]]
    rest = [k for rec in read_keys(root) for k in rec["keys"]]
    assert len(consumed) == resumed_from * BATCH
    assert len(rest) == (MAX_STEPS - resumed_from) * BATCH
    assert not set(consumed) & set(rest), "samples trained on before the kill were replayed"
    assert set(consumed) | set(rest) == {f"train_{i:06d}" for i in range(48)}


def test_sigterm_saves_a_checkpoint_then_the_run_resumes(tmp_path, shards, tok):
    """A real SIGTERM at step 5: last.ckpt holds step 5, the exit code says SIGTERM; the resumed run replaces
    last.ckpt with its final step (it used to write last-v1.ckpt and leave last.ckpt at the preempted step)."""
    pattern = shards([16, 16])
    root = tmp_path / "run"
    common = ["--trainer.max_steps", "8", "--checkpoint.every_n_train_steps", "100", "--data.batch_size", "4"]
    with pytest.raises(SystemExit) as stop:
        run_cli(fit_args(tok, pattern, root, *common, "--trainer.callbacks+", callback_arg(SendSigterm, at_step=5)))
    assert stop.value.code == 128 + signal.SIGTERM
    ckpt = torch.load(root / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 5, "the checkpoint holds the last finished step"
    assert ckpt["WebDataModule"]["batches_in_epoch"] == 5
    assert ckpt["WebDataModule"]["samples_in_epoch"] == 20
    stopped = read_summary(root)
    assert stopped["stopped_by"] == "SIGTERM" and stopped["checkpoint"]["step"] == 5

    run_cli(fit_args(tok, pattern, root, *common, "--ckpt_path", "last"))
    summary = read_summary(root)
    assert (summary["steps"], summary["steps_this_run"]) == (8, 3)
    assert summary["stopped_by"] is None
    assert summary["checkpoint"] == {"path": str(root / "last.ckpt"), "step": 8}
    assert read_project_checkpoint(root / "last.ckpt")["global_step"] == 8, "last.ckpt is the newest state"
    assert sorted(p.name for p in root.glob("last*.ckpt")) == ["last.ckpt"]


def test_last_checkpoint_holds_the_final_step_between_periodic_saves(tmp_path, shards, tok):
    """max_steps 5 with saves every 2 steps: Lightning alone would leave last.ckpt at step 4 (step 5 lost)."""
    root = tmp_path / "run"
    run_cli(fit_args(tok, shards([8, 8]), root, "--trainer.max_steps", "5", "--checkpoint.every_n_train_steps", "2"))
    last = read_project_checkpoint(root / "last.ckpt")
    assert last["global_step"] == 5
    assert (root / "step0000004.ckpt").is_file()  # the periodic saves are still there
