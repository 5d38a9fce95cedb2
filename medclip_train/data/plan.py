"""Which samples each rank and loader worker reads: the pure arithmetic of exact and resampled epochs.

Kept free of I/O so the guarantees can be tested directly:

* exact: the epoch's shard order is shuffled with ``seed + epoch`` (the same on every rank). The N samples of
  that order are split into W contiguous rank ranges of ``ceil(N / W)`` samples; when W does not divide N the
  last range wraps around to the first samples (as ``torch.utils.data.DistributedSampler`` pads), so at most
  W - 1 samples are seen twice and every rank runs the same number of batches (no DDP hang). Inside a rank
  the range is cut into whole batches, and each loader worker takes a contiguous run of batches; only the very
  last batch of the rank may be short, and it is equally short on every rank.
* resampled: shards are drawn with replacement; a shard of source j is drawn with probability proportional to
  w_j / T_j (T_j: samples in source j). A draw yields the whole shard, so the expected share of samples from
  source j is w_j / sum(w), and inside a source every sample is equally likely.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class ShardSlice:
    url: str
    start: int
    stop: int
    """Half-open range of sample positions inside the shard."""


def shuffled_order(n_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    order = list(range(n_shards))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def rank_samples(total: int, world_size: int) -> int:
    return math.ceil(total / world_size)


def worker_batch_range(n_batches: int, num_workers: int, worker_id: int) -> tuple[int, int]:
    return n_batches * worker_id // num_workers, n_batches * (worker_id + 1) // num_workers


def exact_worker_slices(
    urls: list[str],
    sizes: list[int],
    *,
    epoch: int,
    seed: int,
    shuffle: bool,
    rank: int,
    world_size: int,
    worker_id: int,
    num_workers: int,
    batch_size: int,
) -> list[ShardSlice]:
    """The shard slices one worker of one rank reads this epoch, in reading order."""
    order = shuffled_order(len(urls), seed, epoch, shuffle)
    total = sum(sizes)
    per_rank = rank_samples(total, world_size)
    n_batches = math.ceil(per_rank / batch_size)
    b0, b1 = worker_batch_range(n_batches, num_workers, worker_id)
    lo = rank * per_rank + b0 * batch_size
    hi = rank * per_rank + min(b1 * batch_size, per_rank)
    slices: list[ShardSlice] = []
    # Walk the (possibly wrapped) global range [lo, hi) over the shuffled shard order.
    starts, pos = [], 0
    for i in order:
        starts.append(pos)
        pos += sizes[i]
    g = lo
    while g < hi:
        idx = g % total
        k = _find_shard(starts, idx)
        shard = order[k]
        offset = idx - starts[k]
        take = min(sizes[shard] - offset, hi - g)
        slices.append(ShardSlice(urls[shard], offset, offset + take))
        g += take
    return slices


def _find_shard(starts: list[int], idx: int) -> int:
    lo, hi = 0, len(starts) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if starts[mid] <= idx:
            lo = mid
        else:
            hi = mid - 1
    return lo


def exact_worker_batches(total: int, world_size: int, batch_size: int, num_workers: int) -> list[int]:
    """Number of batches each worker yields per epoch (identical on every rank)."""
    n_batches = math.ceil(rank_samples(total, world_size) / batch_size)
    return [
        worker_batch_range(n_batches, num_workers, w)[1] - worker_batch_range(n_batches, num_workers, w)[0]
        for w in range(num_workers)
    ]


def resampled_worker_batches(samples_per_epoch: int, world_size: int, batch_size: int, num_workers: int) -> list[int]:
    n_batches = samples_per_epoch // (world_size * batch_size)
    if n_batches == 0:
        raise ValueError(
            f"data.samples_per_epoch={samples_per_epoch} is smaller than one global batch "
            f"({world_size} ranks x {batch_size})"
        )
    return [
        worker_batch_range(n_batches, num_workers, w)[1] - worker_batch_range(n_batches, num_workers, w)[0]
        for w in range(num_workers)
    ]


def consumed_per_worker(batches_per_worker: list[int], consumed: int) -> list[int]:
    """How many batches of each worker a DataLoader has handed out after ``consumed`` batches.

    The DataLoader takes batches round-robin from its workers, skipping a worker once it is exhausted.
    """
    left = list(batches_per_worker)
    taken = [0] * len(left)
    w = 0
    for _ in range(min(consumed, sum(left))):
        while left[w] == 0:
            w = (w + 1) % len(left)
        taken[w] += 1
        left[w] -= 1
        w = (w + 1) % len(left)
    return taken


def shard_weights(source_of_shard: list[int], sizes: list[int] | None, source_weights: list[float]) -> list[float]:
    """Per-shard sampling probability for resampled mode (see module docstring)."""
    n_sources = len(source_weights)
    shard_mass = [float(s) for s in sizes] if sizes is not None else [1.0] * len(source_of_shard)
    source_mass = [0.0] * n_sources
    for src, m in zip(source_of_shard, shard_mass):
        source_mass[src] += m
    total_weight = sum(source_weights)
    # p_s = w_j / T_j: a shard's sample mass is p_s * size_s, so source j's mass is w_j (see module docstring).
    return [source_weights[src] / total_weight / source_mass[src] for src in source_of_shard]
