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
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np


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


def exact_worker_range(
    total: int, *, rank: int, world_size: int, worker_id: int, num_workers: int, batch_size: int
) -> tuple[int, int]:
    """Half-open range of one worker's places in the epoch's sample list (wrapping past ``total``, see above)."""
    per_rank = rank_samples(total, world_size)
    n_batches = math.ceil(per_rank / batch_size)
    b0, b1 = worker_batch_range(n_batches, num_workers, worker_id)
    return rank * per_rank + b0 * batch_size, rank * per_rank + min(b1 * batch_size, per_rank)


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
    remaining: np.ndarray | None = None,
) -> list[ShardSlice]:
    """The shard slices one worker of one rank reads this epoch, in reading order.

    ``remaining``: the epoch's samples still to train on (positions in the epoch's shard order, ascending), when an
    earlier part of the epoch ran in another layout (elastic resume, :func:`remaining_positions`); default: all.
    """
    order = shuffled_order(len(urls), seed, epoch, shuffle)
    total = sum(sizes) if remaining is None else len(remaining)
    if total == 0:
        return []
    lo, hi = exact_worker_range(
        total, rank=rank, world_size=world_size, worker_id=worker_id, num_workers=num_workers, batch_size=batch_size
    )
    places = np.arange(lo, hi, dtype=np.int64) % total
    positions = places if remaining is None else remaining[places]
    return _position_slices(positions, [urls[i] for i in order], [sizes[i] for i in order])


def _position_slices(positions: np.ndarray, urls: list[str], sizes: list[int]) -> list[ShardSlice]:
    """Epoch positions (over shards ``urls`` of ``sizes``, in that order) as runs of consecutive samples per shard."""
    if len(positions) == 0:
        return []
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    shard = np.searchsorted(starts, positions, side="right") - 1
    offset = positions - starts[shard]
    # A run ends where the shard changes or the next position is not the next sample of the shard.
    breaks = np.flatnonzero((np.diff(shard) != 0) | (np.diff(offset) != 1)) + 1
    bounds = np.concatenate([[0], breaks, [len(positions)]])
    return [
        ShardSlice(urls[int(shard[a])], int(offset[a]), int(offset[b - 1]) + 1) for a, b in zip(bounds[:-1], bounds[1:])
    ]


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


# ---- the shuffle buffer and elastic resume ------------------------------------------------------------------------
def order_rng(seed: int, epoch: int, rank: int, worker_id: int, part: int) -> random.Random:
    """The generator of one worker's shuffle buffer. Its own generator (caption draws use another) so that the order
    depends on the number of samples only, and the samples a worker delivered can be recomputed from the plan: a
    resume in another layout needs them (:func:`remaining_positions`). A string seed is hashed with SHA-512 by
    ``random``, the same in every process whatever ``PYTHONHASHSEED`` says. ``part``: the epoch part (exact) or the
    restart count (resampled, which must draw a new stream after a resume)."""
    return random.Random(f"order:{seed}:{epoch}:{rank}:{worker_id}:{part}")


def shuffle_buffer(items: Iterator, rng: random.Random, size: int, initial: int) -> Iterator:
    """A seeded shuffle buffer that starts yielding once ``initial`` items are in and then grows to ``size`` by
    reading two items per item it yields (webdataset's ``shuffle(bufsize, initial)``). Filling the whole buffer first
    stalled every epoch start: each worker read ``size`` raw samples (5000 in the pretraining config, 64 workers a
    node) before its first batch. Every item is yielded exactly once; the order depends on ``rng`` and the number of
    items only, never on their content, so a plan can replay it on positions instead of samples."""
    if size <= 1:
        yield from items
        return
    initial = max(1, min(initial, size))
    buf = []
    for item in items:
        buf.append(item)
        if len(buf) < size:
            extra = next(items, _END)
            if extra is not _END:
                buf.append(extra)
        if len(buf) >= initial:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


_END = object()


@dataclass(frozen=True)
class EpochPart:
    """A part of an exact epoch trained in one layout, ended by a resume in another (elastic resume)."""

    world_size: int
    num_workers: int
    batch_size: int
    shuffle_buffer: int
    shuffle_initial: int
    batches: int
    """Batches each rank trained on in this part (every rank runs the same number)."""


def remaining_positions(total: int, parts: list[EpochPart], *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Positions (in the epoch's shard order, ascending) of the samples the earlier ``parts`` of the epoch did not
    train on: each part's plan is replayed over what the parts before it left, and each worker's delivered samples
    are the first of its shuffled order (the DataLoader takes whole batches round-robin, see consumed_per_worker).

    Costs a byte and eight per sample of the epoch and the replay of the shuffle buffers in Python (about a second
    per million samples delivered), once per resume in another layout.
    """
    left = np.arange(total, dtype=np.int64)
    for k, part in enumerate(parts):
        if len(left) == 0:
            break
        taken = np.zeros(total, dtype=bool)
        workers = max(part.num_workers, 1)
        delivered = consumed_per_worker(
            exact_worker_batches(len(left), part.world_size, part.batch_size, workers), part.batches
        )
        for rank in range(part.world_size):
            for w in range(workers):
                lo, hi = exact_worker_range(
                    len(left), rank=rank, world_size=part.world_size, worker_id=w, num_workers=workers,
                    batch_size=part.batch_size,
                )  # fmt: skip
                mine = left[np.arange(lo, hi, dtype=np.int64) % len(left)]
                n = min(delivered[w] * part.batch_size, len(mine))
                size = part.shuffle_buffer if shuffle else 0
                order = shuffle_buffer(iter(range(len(mine))), order_rng(seed, epoch, rank, w, k), size,
                                       part.shuffle_initial)  # fmt: skip
                taken[mine[list(islice(order, n))]] = True
        left = left[~taken[left]]
    return left
