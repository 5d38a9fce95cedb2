"""The few collective operations the losses need, read from ``torch.distributed`` at call time.

Nothing here is set up at import or construction: the same loss module works in one process, under
``torchrun`` and under Lightning's DDP strategy, which initialises the process group after the model exists.
Every helper is the identity (or a detached copy) when no process group is initialised.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launcher_num_nodes(configured: int | None) -> int | None:
    """``trainer.num_nodes`` as the launcher started the run: torchrun's WORLD_SIZE / LOCAL_WORLD_SIZE, or SLURM's
    SLURM_NNODES. Lightning does not read it from there: it checks devices x num_nodes against the world size and
    refuses a run on 4 nodes whose num_nodes was left at its default of 1. A value other than 1 is the user's and
    is kept (a mismatch is then Lightning's one-line error).
    """
    env, nodes = os.environ, None
    if (
        "TORCHELASTIC_RUN_ID" in env
        and env.get("WORLD_SIZE", "").isdigit()
        and env.get("LOCAL_WORLD_SIZE", "").isdigit()
    ):
        world, local = int(env["WORLD_SIZE"]), int(env["LOCAL_WORLD_SIZE"])
        nodes = world // local if local and world % local == 0 else None
    elif "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        nodes = int(env["SLURM_NNODES"]) if env.get("SLURM_NNODES", "").isdigit() else None
    if nodes is None or configured not in (None, 1):
        return configured
    return nodes


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, keeping autograd through every rank's slice.

    The backward pass sums the gradients that all ranks computed for this rank's slice (a reduce-scatter), so a
    loss over the gathered tensor, computed on every rank and averaged by DDP, has the gradient of the loss over
    the global batch. All ranks must pass the same shape (equal local batch sizes).

    Args:
        tensor: ``(B, ...)`` on this rank.

    Returns:
        ``(world_size * B, ...)``, rank 0's rows first; ``tensor`` itself when not distributed.
    """
    _, world_size = world_info()
    if world_size == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor), dim=0)


def gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Like :func:`gather_with_grad` but without autograd (for labels, targets, metrics).

    Returns:
        ``(world_size * B, ...)``, detached; ``tensor.detach()`` when not distributed.
    """
    _, world_size = world_info()
    if world_size == 1:
        return tensor.detach()
    tensor = tensor.detach().contiguous()
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, dim=0)


__all__ = ["gather_no_grad", "gather_with_grad", "world_info"]
