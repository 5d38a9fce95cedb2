"""The run folder (``trainer.default_root_dir``): one run at a time, nothing of another run lost or overwritten.

Everything here runs in the launching process before the model is built, and only on the launcher's rank zero:
Lightning's DDP launcher re-runs the same command for the other local ranks, and torchrun/SLURM start every rank
with it, so each rank passes through the CLI; the folder is prepared once (no race between ranks moving
``metrics.csv`` aside, no second rank taking the lock).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import sys
import time

LOCK_NAME = ".run.lock"
# Environment variables the launchers set (torchrun: RANK/GROUP_RANK; Lightning's DDP launcher: LOCAL_RANK and
# NODE_RANK in the processes it starts; SLURM: SLURM_PROCID). Rank zero of the whole run has all of them 0 or unset.
_RANK_VARIABLES = ("RANK", "GROUP_RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


_HELD: list[RunLock] = []


def release_held_locks() -> None:
    """Release every lock this process holds (the CLI's exit, and atexit for an exception nobody caught)."""
    while _HELD:
        _HELD.pop().release()


atexit.register(release_held_locks)


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder."""


def is_launcher_rank_zero() -> bool:
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "0").strip() or "0"
        if value.isdigit() and int(value) != 0:
            return False
    return True


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (field 22 of /proc/PID/stat): tells a live owner from a reused PID."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_alive(owner: dict) -> bool:
    pid = int(owner.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = owner.get("start_time")
    return started is None or _process_start_time(pid) in (None, started)


class RunLock:
    """An exclusive lock on a run folder: a ``.run.lock`` file created with ``O_EXCL`` that names its owner.

    Not ``flock``: on the shared filesystems that hold run folders (NFS, Lustre) it is often a no-op or local to
    the node. A lock left by a dead process on this host (SIGKILL, OOM killer) is taken over with a warning; one
    of another host cannot be checked from here, so the message says which host and PID hold it.
    """

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self.held = False

    def acquire(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "start_time": _process_start_time(os.getpid()),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "command": " ".join(sys.argv)[:500],
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.held = True
            _HELD.append(self)
            return
        raise RunFolderBusy(f"{self.path}: could not take the run folder's lock")

    def _take_over_if_stale(self) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                owner = json.load(f)
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            owner = {}
        where = f"PID {owner.get('pid', '?')} on {owner.get('host', '?')}"
        if owner.get("host") == socket.gethostname() and not _owner_alive(owner):
            print(
                f"warning: {self.folder}: taking over the lock of a run that is no longer alive ({where})",
                file=sys.stderr,
            )
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            return
        raise RunFolderBusy(
            f"{self.folder}: another run is using this run folder ({where}, since {owner.get('since', '?')}); "
            f"choose another trainer.default_root_dir, or remove {self.path} if that run is gone"
        )

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            self.held = False


def remove_stale_checkpoint_temporaries(folder: str) -> list[str]:
    """Temporary files of ``AtomicCheckpointIO`` (``.NAME.ckpt.XXXX.tmp``) left by a process killed mid-save.

    Only called with the run folder's lock held, so no live writer owns them; other files are never touched.
    """
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        if name.startswith(".") and name.endswith(".tmp") and ".ckpt." in name:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))
                removed.append(name)
    return removed


def keep_previous_metrics(folder: str) -> str | None:
    """On resume, move the earlier ``metrics.csv`` aside (Lightning's CSV logger would overwrite it)."""
    path = os.path.join(folder, "metrics.csv")
    if not os.path.isfile(path):
        return None
    n = 1
    while os.path.exists(os.path.join(folder, f"metrics.part{n}.csv")):
        n += 1
    target = os.path.join(folder, f"metrics.part{n}.csv")
    os.replace(path, target)
    return target
