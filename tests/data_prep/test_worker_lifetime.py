"""Pool workers die with medclip-prep: a real converter process, killed by a real signal, leaves no orphan behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from /proc (Linux)"),
]

# A demo far too large to finish: the converter is busy feeding its two workers when it is killed.
CONVERT = ["demo", "--n-train", "200000", "--n-val", "0", "--n-test", "0", "--image-size", "64", "--workers", "2",
           "--quiet"]  # fmt: skip
# The same run with a second thread started first: medclip-prep then starts workers from a forkserver.
WITH_THREAD = (
    "import sys, threading, time; threading.Thread(target=time.sleep, args=(3600,), daemon=True).start(); "
    "from data_prep.cli import main; sys.exit(main(sys.argv[1:]))"
)


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state, ppid, ...); ``None`` when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (workers, and the forkserver and resource tracker when there are some)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) is not None and fields[0] != "Z":
            parents[int(entry)] = int(fields[2 - 1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"  # an orphan killed but not yet reaped by init is a zombie


@pytest.mark.parametrize("start", ["fork", "forkserver"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_workers_die_with_the_converter(start, sig, tmp_path):
    out = tmp_path / "out"
    python = [sys.executable, "-c", WITH_THREAD] if start == "forkserver" else [sys.executable, "-m", "data_prep.cli"]
    proc = subprocess.Popen([*python, *CONVERT, "--output", str(out)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    spawned: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while len(spawned) < 2 and time.monotonic() < deadline:
            spawned = descendants(proc.pid)
            time.sleep(0.1)
        assert len(spawned) >= 2, f"the converter did not start its workers: {proc.poll()} {proc.stderr.read()}"
        time.sleep(0.5)  # let them take work: a worker busy drawing is the case that used to outlive the parent
        spawned = descendants(proc.pid)
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 5
        while any(alive(p) for p in spawned) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in spawned if alive(p)], "workers outlived the converter"
        if sig == signal.SIGTERM:  # a signal it can handle: cleaned up, exit status of a SIGTERM death
            assert proc.returncode == 128 + signal.SIGTERM, proc.stderr.read()
            assert not list(out.glob("*.tmp"))
    finally:
        for pid in spawned | ({proc.pid} if proc.poll() is None else set()):
            if alive(pid):  # never leave an orphan behind, even when the test fails
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)
