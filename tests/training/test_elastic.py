"""Elastic resume, really run: a run checkpointed in the middle of an exact epoch on one number of ranks x loader
workers resumes on another (Lightning's own DDP launcher, gloo on CPU) and trains every sample of the epoch once."""

from __future__ import annotations

import collections
import sys

import pytest

from tests.training.conftest import KeyRecorder, callback_arg, fit_args, read_keys, read_summary
from tests.training.test_multinode import REPO, clean_env, launch, wait_all

KEYS = ("--trainer.callbacks+", callback_arg(KeyRecorder))


def fit(tok, pattern, root, devices: int, workers: int, max_steps: int, *extra) -> None:
    args = fit_args(
        tok, pattern, root, "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp" if devices > 1 else "auto",
        "--trainer.devices", str(devices), "--data.num_workers", str(workers), "--data.batch_size", "2",
        "--trainer.max_steps", str(max_steps), *KEYS, *extra,
    )  # fmt: skip
    log = root.parent / f"fit-{max_steps}.log"
    wait_all([launch([sys.executable, str(REPO / "train.py"), *args], log, clean_env())], [log], timeout=300)


def epoch_keys(root, ranks: int) -> collections.Counter:
    return collections.Counter(k for rank in range(ranks) for r in read_keys(root, rank) for k in r["keys"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("before", "after", "steps"),
    [
        # 16 samples, batches of 2. 2 ranks x 2 workers: 4 steps an epoch; 2 done, then 8 samples on 1 x 1: 4 steps.
        ((2, 2), (1, 1), (2, 6)),
        # 1 rank x 2 workers: 8 steps an epoch; 3 done, then 10 samples on 2 x 1: 5 a rank, steps of 2, 2 and 1.
        ((1, 2), (2, 1), (3, 6)),
    ],
    ids=["2x2 -> 1x1", "1x2 -> 2x1"],
)
def test_a_resume_on_other_ranks_and_workers_trains_every_sample_of_the_epoch_once(tmp_path, shards, tok, before,
                                                                                      after, steps):  # fmt: skip
    pattern = shards([9, 7])
    root = tmp_path / "run"
    fit(tok, pattern, root, *before, steps[0])
    fit(tok, pattern, root, *after, steps[1], "--ckpt_path", "last")
    seen = epoch_keys(root, max(before[0], after[0]))
    assert seen == {f"train_{i:06d}": 1 for i in range(16)}, "every sample of the epoch once, none twice"
    summary = read_summary(root)
    assert summary["steps"] == steps[1] and summary["samples_seen"] == 16 and summary["world_size"] == after[0]
