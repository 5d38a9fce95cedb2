"""SIGTERM under DDP (2 CPU ranks over gloo, launched by ``train.py``): a signal to one rank or to all stops every
rank after the same step, ``last.ckpt`` is saved once, the run exits at once with 128 + 15, and it resumes.

Before: Lightning's handler raised on the rank that got the signal, whose checkpoint barrier then waited for the
other rank, which was already in the next step's collectives, until the process-group timeout; nothing saved."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.training.conftest import KeyRecorder, SlowDown, callback_arg, fit_args, read_keys, read_summary, train_py

DDP_CPU = "--trainer.devices 2 --trainer.strategy ddp --trainer.accelerator cpu".split()
MAX_STEPS = 12


class PidRecorder(L.Callback):
    """Writes ``pid-rank<R>`` into the run folder as training starts, so that a test can signal one rank."""

    def on_train_start(self, trainer, pl_module) -> None:
        (Path(trainer.default_root_dir) / f"pid-rank{trainer.global_rank}").write_text(str(os.getpid()))


def _start(tok, pattern, root: Path, log: Path, *extra: str) -> subprocess.Popen:
    args = [
        *DDP_CPU,
        *f"--data.batch_size 4 --trainer.max_steps {MAX_STEPS} --checkpoint.every_n_train_steps 100".split(),
        *("--trainer.callbacks+", callback_arg(KeyRecorder)),
        *("--trainer.callbacks+", callback_arg(PidRecorder)),
        *extra,
    ]
    return train_py(fit_args(tok, pattern, root, *args), log=log, start_new_session=True)


def _wait(proc: subprocess.Popen, log: Path, timeout_s: float) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the 2-rank run did not end within {timeout_s} s:\n{log.read_text()[-3000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("target", ["rank1", "all"])
def test_sigterm_to_one_rank_or_all_stops_both_saves_once_and_resumes(tmp_path, shards, tok, target):
    pattern = shards([24, 24])  # 48 samples: 24 per rank, 6 batches of 4 an epoch
    root = tmp_path / "run"
    log = tmp_path / "run.log"
    slow = ("--trainer.callbacks+", callback_arg(SlowDown, delay_s=0.5))
    proc = _start(tok, pattern, root, log, *slow)
    deadline = time.monotonic() + 300
    while len(read_keys(root, 1)) < 3:  # rank 1 has trained 3 steps
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
            pytest.fail(f"the run ended or stalled before step 3:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    if target == "rank1":
        os.kill(int((root / "pid-rank1").read_text()), signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGTERM)  # a scheduler signals every process of the job
    sent = time.monotonic()
    code = _wait(proc, log, timeout_s=60)
    assert time.monotonic() - sent < 30, "the stop took longer than a few steps"
    assert code == 128 + signal.SIGTERM, log.read_text()[-3000:]

    stopped = torch.load(root / "last.ckpt", map_location="cpu", weights_only=True)
    step = stopped["global_step"]
    assert 3 <= step < MAX_STEPS
    ranks = [read_keys(root, r) for r in (0, 1)]
    assert [len(r) for r in ranks] == [step, step], "both ranks stopped after the same step"
    assert read_summary(root)["stopped_by"] == "SIGTERM"
    if target == "all":
        return

    for r in (0, 1):
        (root / f"keys-rank{r}.jsonl").rename(root / f"keys-rank{r}.first.jsonl")
    proc = _start(tok, pattern, root, tmp_path / "resume.log", "--ckpt_path", "last")
    assert _wait(proc, tmp_path / "resume.log", timeout_s=400) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    summary = read_summary(root)
    assert summary["steps"] == MAX_STEPS and summary["checkpoint"]["step"] == MAX_STEPS
    # The first part's metrics were moved aside once, by rank zero (every rank used to try).
    assert (root / "metrics.part1.csv").is_file() and not (root / "metrics.part2.csv").exists()
    # The first epoch (6 steps) is completed exactly: no sample of it trained twice, none left out.
    first_epoch = [
        k
        for r in (0, 1)
        for rec in [*ranks[r], *read_keys(root, r)]
        if rec["step"] <= 6  # KeyRecorder notes the step count after the step
        for k in rec["keys"]
    ]
    assert sorted(first_epoch) == sorted({f"train_{i:06d}" for i in range(48)})
