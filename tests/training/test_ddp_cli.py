"""Two CPU ranks (gloo) through ``train.py fit``: Lightning launches the second process, the ranks read disjoint
samples, and shards of unequal sizes do not make one rank wait for the other forever."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from tests.training.conftest import KeyRecorder, callback_arg, fit_args, read_keys, read_summary, train_py

DDP_CPU = "--trainer.devices 2 --trainer.strategy ddp --trainer.accelerator cpu".split()


@pytest.mark.slow
def test_two_cpu_ranks_train_on_disjoint_samples_of_unequal_shards(tmp_path, shards, tok):
    # 7 + 13 samples: a shard boundary inside one rank's range; 10 per rank in batches of 4, 4 and a short 2.
    # One bad sample in each shard, so that each rank has one to skip (the shard order is shuffled, the halves
    # are [shard A | shard B] in either order, and each half holds one of the two).
    pattern = shards([7, 13], corrupt={2: "garbage", 15: "garbage"})
    root = tmp_path / "run"
    args = ["--data.batch_size", "4", "--trainer.max_steps", "3", "--checkpoint.every_n_train_steps", "3"]
    proc = train_py(
        fit_args(tok, pattern, root, *DDP_CPU, *args, "--trainer.callbacks+", callback_arg(KeyRecorder)),
        start_new_session=True,  # its own process group: a timeout kills both ranks
    )
    try:
        _, err = proc.communicate(timeout=400)  # a hang (one rank waiting in a collective) ends here
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail("2-rank DDP run did not finish: a rank is waiting in a collective")
    assert proc.returncode == 0, err[-3000:]

    summary = read_summary(root)
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert summary["samples_seen"] == 20
    assert summary["skipped_samples"] == 2, "the summary counts the bad samples of every rank"
    ranks = [read_keys(root, rank) for rank in (0, 1)]
    assert [[len(r["keys"]) for r in recs] for recs in ranks] == [[4, 4, 2], [4, 4, 2]]
    keys = [{k for r in recs for k in r["keys"]} for recs in ranks]
    assert not keys[0] & keys[1], "the ranks trained on overlapping samples"
    assert keys[0] | keys[1] == {f"train_{i:06d}" for i in range(20) if i not in (2, 15)}
    assert (root / "last.ckpt").is_file()
