"""Multi-node launches, really run on this machine (gloo on CPU, 127.0.0.1): 2 "nodes" x 1 process started by
``torchrun`` (c10d rendezvous) and by SLURM's environment set by hand, then a resume of the same exact epoch on
1 node x 2 processes (Lightning's own launcher). The commands are the README's (scaled down: 4 nodes x 8 GPUs there).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.training.conftest import REPO, KeyRecorder, callback_arg, fit_args, read_keys, read_summary

CPU = ["--trainer.accelerator", "cpu", "--trainer.strategy", "ddp"]
# 16 samples in shards of 9 and 7, 2 ranks, batches of 2: 4 steps per rank make one exact epoch.
COMMON = ["--data.batch_size", "2", "--checkpoint.every_n_train_steps", "2", "--trainer.callbacks+"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> dict[str, str]:
    """This process's environment without any launcher's variables (a CI job may itself run under SLURM)."""
    launcher = ("SLURM_", "RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "MASTER_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    return {**env, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo"}


def launch(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """A process of the run in its own session (a hang kills its children too), output to ``log``."""
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float) -> None:
    """Wait for every process; on a hang kill them all (their own sessions), and fail with their log tails."""
    try:
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        pytest.fail("multi-node run hung:\n" + "\n".join(log.read_text()[-2000:] for log in logs))
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log.read_text()[-4000:]


def resume_on_one_node_two_processes(tok, pattern: str, root: Path) -> None:
    """``--ckpt_path last`` on 1 node x 2 processes (Lightning starts the second) to the end of the epoch."""
    args = fit_args(
        tok, pattern, root, *CPU, "--trainer.devices", "2", "--trainer.max_steps", "4", *COMMON,
        callback_arg(KeyRecorder), "--ckpt_path", "last",
    )  # fmt: skip
    log = root.parent / "resume.log"
    proc = launch([sys.executable, str(REPO / "train.py"), *args], log, clean_env())
    wait_all([proc], [log], timeout=300)


def check_one_exact_epoch(root: Path) -> None:
    """Steps 1-2 on the 2 nodes, 3-4 after the resume: the 16 samples once each, the ranks always disjoint."""
    records = [read_keys(root, rank) for rank in (0, 1)]
    steps = [[r["step"] for r in recs] for recs in records]
    assert steps == [[1, 2, 3, 4], [1, 2, 3, 4]], "each rank trained 2 steps on 2 nodes, then 2 after the resume"
    keys = [k for recs in records for r in recs for k in r["keys"]]
    assert sorted(keys) == [f"train_{i:06d}" for i in range(16)], "one exact epoch: every sample once, none twice"
    summary = read_summary(root)
    assert summary["world_size"] == 2 and summary["steps"] == 4 and summary["samples_seen"] == 16


@pytest.mark.slow
def test_torchrun_two_nodes_then_resume_on_one_node_two_processes(tmp_path, shards, tok):
    pattern = shards([9, 7])
    root = tmp_path / "run"
    port = free_port()
    args = fit_args(
        tok, pattern, root, *CPU, "--trainer.devices", "1",
        "--trainer.max_steps", "2", *COMMON, callback_arg(KeyRecorder),
    )  # fmt: skip
    procs, logs = [], []
    for node_rank in (0, 1):
        torchrun = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
            "--node-rank", str(node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", "medclip-test",
        ]  # fmt: skip
        logs.append(tmp_path / f"node{node_rank}.log")
        procs.append(launch([*torchrun, str(REPO / "train.py"), *args], logs[-1], clean_env()))
    wait_all(procs, logs, timeout=300)
    summary = read_summary(root)
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert (root / "last.ckpt").is_file()
    assert not (root / ".run.lock").exists(), "rank zero released the run folder's lock"

    resume_on_one_node_two_processes(tok, pattern, root)
    check_one_exact_epoch(root)


@pytest.mark.slow
def test_slurm_two_nodes_two_tasks(tmp_path, shards, tok):
    """What ``srun`` sets for 2 nodes x 1 task, set by hand: Lightning's SLURMEnvironment takes the world from it."""
    pattern = shards([9, 7])
    root = tmp_path / "run"
    args = fit_args(
        tok, pattern, root, *CPU, "--trainer.devices", "1",
        "--trainer.max_steps", "2", *COMMON, callback_arg(KeyRecorder),
    )  # fmt: skip
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "medclip",  # not "bash"/"interactive": Lightning would not detect SLURM then
        "SLURM_NTASKS": "2",
        "SLURM_NNODES": "2",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NODELIST": "127.0.0.1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    procs, logs = [], []
    for rank in (0, 1):
        env = {**clean_env(), **slurm, "SLURM_PROCID": str(rank), "SLURM_LOCALID": "0", "SLURM_NODEID": str(rank)}
        logs.append(tmp_path / f"task{rank}.log")
        procs.append(launch([sys.executable, str(REPO / "train.py"), *args], logs[-1], env))
    wait_all(procs, logs, timeout=300)
    summary = read_summary(root)
    assert summary["world_size"] == 2 and summary["steps"] == 2 and summary["samples_seen"] == 8
    # (The resume of a 2-node run on 1 node x 2 processes is the torchrun test's; it takes a minute more.)
    keys = [{k for r in read_keys(root, rank) for k in r["keys"]} for rank in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == 4 and not keys[0] & keys[1], "each task read its own samples"


@pytest.mark.parametrize(
    ("env", "configured", "expected"),
    [
        ({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "32", "LOCAL_WORLD_SIZE": "8"}, 1, 4),  # torchrun 4 x 8
        ({"SLURM_NTASKS": "32", "SLURM_NNODES": "4", "SLURM_JOB_NAME": "pretrain"}, 1, 4),  # srun 4 nodes
        ({"SLURM_NTASKS": "32", "SLURM_NNODES": "4", "SLURM_JOB_NAME": "bash"}, 1, 1),  # salloc shell: no SLURM
        ({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "32", "LOCAL_WORLD_SIZE": "8"}, 2, 2),  # the user's value kept
        ({"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, 1, 1),  # Lightning's own launcher: one node
    ],
)
def test_num_nodes_is_taken_from_the_launcher(monkeypatch, env, configured, expected):
    from medclip_train.distributed import launcher_num_nodes

    for name in list(os.environ):
        if name.startswith(("SLURM_", "TORCHELASTIC_", "WORLD_SIZE", "LOCAL_WORLD_SIZE")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launcher_num_nodes(configured) == expected
