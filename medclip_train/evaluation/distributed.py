"""Image encoding split over the processes of ``torchrun --nproc-per-node N medclip-eval suite ...``.

Each rank encodes every N-th sample of a dataset (shards: every N-th shard) and the features are gathered with
``all_gather_object`` into the order one process reads them in, so every figure equals a one-process run. A process
group is only started when ``torchrun`` set ``WORLD_SIZE`` > 1; it is gloo, since what travels is CPU tensors.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

GATHER_TIMEOUT = timedelta(hours=4)
"""Ranks > 0 wait in the next gather while rank 0 computes one model's metrics (probes, t-SNE) alone."""


def init_from_env() -> bool:
    """Join the ``torchrun`` process group (gloo) when there is one to join; True when running distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=GATHER_TIMEOUT)
    return world_size() > 1


def rank_device(device: str) -> str:
    """``cuda`` under ``torchrun``: this rank's GPU (``LOCAL_RANK``); any other device as given."""
    if device == "cuda" and world_size() > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return device


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def from_rank0(value):
    """Rank 0's ``value`` on every rank (a cache hit decided once, so that no rank waits in a gather alone)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value) -> list:
    """``[value of rank 0, value of rank 1, ...]`` on every rank."""
    if world_size() == 1:
        return [value]
    out = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask of a container or a SLURM job, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers() -> int:
    """Loader processes per rank: the available cores shared among this node's ranks."""
    return max(1, available_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
