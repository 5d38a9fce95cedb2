"""The training/validation sample stream: shards -> samples -> decoded, transformed, tokenized batches.

Runs inside DataLoader workers. Batching happens in the worker (``batch_size=None`` in the DataLoader) so the
tokenizer runs once per batch on a list of captions, which is several times faster than per sample.

Bad samples (undecodable image, missing or empty or non-UTF-8 caption) and the samples lost to a truncated or
corrupt shard are skipped and counted. To keep batch shapes equal on every rank (the contrastive loss gathers
features across ranks), a skipped sample's slot is filled with the previous good sample of the same worker,
so an epoch still has exactly the planned number of batches. Past ``max_skip_fraction`` the run stops with an
error naming the shard.

Remote shards (any fsspec URL: ``https://``, ``s3://``...) are streamed through fsspec; ``pipe:`` commands and local
files through webdataset's ``gopen``. data/tar.py groups their tar members into samples as webdataset does, with less
Python per member than its ``tarfile`` reader. A transient read error (connection reset, timeout, HTTP 5xx/429)
reopens the shard after a backoff and skips the samples already yielded from it, so the stream goes on at the sample
it reached; a permanent one (404, 403, a corrupt tar) loses the rest of the shard, counted and named like a truncated
shard.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen

from medclip_train.data import tar
from medclip_train.data.decode import IMAGE_EXTS, TEXT_EXTS, SampleError, decode_image, decode_meta, decode_text, pick
from medclip_train.data.labels import LabelVocab, sample_labels
from medclip_train.data.pixels import PixelSlots
from medclip_train.data.plan import (
    EpochPart,
    consumed_per_worker,
    exact_worker_batches,
    exact_worker_slices,
    order_rng,
    remaining_positions,
    resampled_worker_batches,
    shard_weights,
    shuffle_buffer,
)
from medclip_train.data.sources import is_fsspec_url, redact

_END = object()
log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """The data stream cannot go on (too many bad samples); the message names the shard."""


@dataclass
class StreamSpec:
    """Everything a worker needs to produce its batches; pickled into each worker."""

    urls: list[str]
    sizes: list[int] | None
    source_of_shard: list[int]
    source_weights: list[float]
    batch_size: int
    transform: Callable
    tokenizer: Callable
    image_size: int
    mode: str = "exact"
    """``exact`` or ``resampled``."""
    samples_per_epoch: int | None = None
    shuffle: bool = True
    shuffle_buffer: int = 1000
    shuffle_initial: int = 100
    """Samples in the shuffle buffer before the first is yielded (it then grows to ``shuffle_buffer``)."""
    seed: int = 0
    vocab: LabelVocab | None = None
    random_caption: bool = True
    trim_padding: bool = True
    max_skip_fraction: float = 0.05
    min_samples_for_skip_check: int = 200
    max_leading_bad: int = 50
    """Stop when this many samples were read and none was good, whatever ``min_samples_for_skip_check`` says."""
    pad_token_id: int = 0
    read_retries: int = 5
    """Reopen attempts of a shard after a transient read error that made no progress since the last attempt."""
    retry_backoff_s: float = 1.0
    """First wait before reopening a shard; doubled on each further attempt (at most 60 s)."""
    # Set by the DataLoader in the main process before workers start (see datamodule.StreamLoader).
    epoch: int = 0
    skip_batches: int = 0
    """Batches of this rank already trained on in the current part of the epoch."""
    parts: list[EpochPart] = field(default_factory=list)
    """Earlier parts of the epoch, trained in other layouts (elastic resume, see data/plan.py)."""
    restarts: int = 0
    num_workers: int = 1
    world: tuple[int, int] = field(default_factory=lambda: (0, 1))
    pixel_slots: PixelSlots | None = None
    """Reused shared-memory pixel batches of the workers (set per iteration by the loader; data/pixels.py)."""


class ShardStream(IterableDataset):
    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec
        self._remaining: tuple[tuple, np.ndarray | None] = ((), None)

    def remaining(self, epoch: int | None = None, parts: list[EpochPart] | None = None) -> np.ndarray | None:
        """Exact mode after parts of the epoch in other layouts: the positions of the samples they left (computed
        once per epoch and parts, in the main process before the workers start, so each worker gets it); else None.
        ``epoch``/``parts``: default the spec's."""
        s = self.spec
        epoch = s.epoch if epoch is None else epoch
        parts = s.parts if parts is None else parts
        if s.mode != "exact" or not parts:
            return None
        key = (epoch, tuple(parts))
        if self._remaining[0] != key:
            left = remaining_positions(sum(s.sizes), parts, seed=s.seed, epoch=epoch, shuffle=s.shuffle)
            self._remaining = (key, left)
        return self._remaining[1]

    def batches_per_worker(
        self, world: tuple[int, int] | None = None, epoch: int | None = None, parts: list[EpochPart] | None = None
    ) -> list[int]:
        """Batches of each worker of one rank in the current part of the epoch, on ``world`` (rank, world size),
        after the earlier ``parts`` of ``epoch``; default: the spec's."""
        s = self.spec
        _, world_size = world or s.world
        parts = s.parts if parts is None else parts
        workers = max(s.num_workers, 1)
        if s.mode == "exact":
            left = self.remaining(epoch, parts)
            total = sum(s.sizes) if left is None else len(left)
            return exact_worker_batches(total, world_size, s.batch_size, workers) if total else [0] * workers
        samples = s.samples_per_epoch - sum(p.batches * p.batch_size * p.world_size for p in parts)
        if parts and samples < world_size * s.batch_size:
            return [0] * workers  # what earlier parts left of the virtual epoch is less than one global batch
        return resampled_worker_batches(samples, world_size, s.batch_size, workers)

    def __len__(self) -> int:
        return sum(self.batches_per_worker())

    def __iter__(self) -> Iterator[dict]:
        s = self.spec
        info = get_worker_info()
        worker_id = info.id if info is not None else 0
        n_workers = max(s.num_workers, 1)
        counts = self.batches_per_worker()
        skip = consumed_per_worker(counts, s.skip_batches)[worker_id]
        n_batches = counts[worker_id] - skip
        reader = _SampleReader(s, worker_id)
        if s.mode == "exact":
            rank, world_size = s.world
            slices = exact_worker_slices(
                s.urls,
                s.sizes,
                epoch=s.epoch,
                seed=s.seed,
                shuffle=s.shuffle,
                rank=rank,
                world_size=world_size,
                worker_id=worker_id,
                num_workers=n_workers,
                batch_size=s.batch_size,
                remaining=self.remaining(),
            )
            raw = reader.exact_samples(slices)
        else:
            raw = reader.resampled_samples()
        raw = _skip(raw, skip * s.batch_size)
        yield from reader.batches(raw, n_batches)


def _skip(it: Iterator, n: int) -> Iterator:
    """Drop the first ``n`` raw samples (already trained on before a resume); raw bytes, nothing decoded."""
    for _ in range(n):
        if next(it, _END) is _END:
            break
    return it


class _SampleReader:
    """Reads raw samples for one worker, decodes them, and forms batches."""

    def __init__(self, spec: StreamSpec, worker_id: int):
        self.s = spec
        rank, _ = spec.world
        # Exact mode replays its epoch plan after a resume; resampled mode must draw a new stream after a resume, so
        # there both generators depend on the restart count.
        restarts = spec.restarts if spec.mode == "resampled" else 0
        self.rng = random.Random(hash((spec.seed, spec.epoch, rank, worker_id, restarts)))
        """Caption draws and resampled shard draws."""
        part = spec.restarts if spec.mode == "resampled" else len(spec.parts)
        self.order_rng = order_rng(spec.seed, spec.epoch, rank, worker_id, part)
        """The shuffle buffer's own generator: its order must be recomputable from the plan (data/plan.py)."""
        self.worker_id = worker_id
        self.read = 0
        self.skipped = 0
        self.skipped_since_batch = 0
        self.last_error: dict[str, str] = {}
        self.last_bad = ("", "")
        self.current_url = ""
        self.retries = 0
        self.retries_since_batch = 0

    # ---- raw samples -------------------------------------------------------------------------------------------
    def _shard_samples(self, url: str) -> Iterator[dict]:
        """The samples of one shard; after a transient read error the shard is reopened and the samples already
        yielded are skipped (raw bytes), so the caller sees each sample once, in order."""
        self.current_url = url
        done = 0  # samples of this shard handed to the caller
        attempts = 0  # reopenings since the stream last got past `done`
        while True:
            failure: list[Exception] = []
            position, progressed = 0, False
            passes = self._read_shard(url, failure)
            # At a read error the pass ends without the group it was gathering (it may be cut short); see data/tar.py.
            for sample in passes:
                if position >= done:
                    done += 1
                    progressed = True
                    yield sample
                position += 1
            passes.close()
            if not failure:
                return
            exn = failure[0]
            attempts = 0 if progressed else attempts
            if not _transient(exn) or attempts >= self.s.read_retries:
                # Permanent, or out of attempts: the rest of the shard is lost (counted by the caller).
                self.last_error[url] = redact(f"{type(exn).__name__}: {exn}")
                return
            wait = min(self.s.retry_backoff_s * 2**attempts, 60.0)
            attempts += 1
            self.retries += 1
            self.retries_since_batch += 1
            log.warning(
                "shard %s: %s after %d samples; reopening in %.1f s (attempt %d of %d)",
                redact(url),
                redact(f"{type(exn).__name__}: {exn}"),
                done,
                wait,
                attempts,
                self.s.read_retries,
            )
            time.sleep(wait)

    def _read_shard(self, url: str, failure: list[Exception]) -> Iterator[dict]:
        """One pass over a shard's samples (data/tar.py groups its files as webdataset does); the first read error
        is put in ``failure`` and ends the pass: _shard_samples decides between reopening and losing the rest."""
        try:
            stream = _open_shard(url)
        except Exception as exn:  # noqa: BLE001 - classified by _transient, reported with the shard
            failure.append(exn)
            return
        try:
            yield from tar.samples(stream, url)
        except Exception as exn:  # noqa: BLE001 - a read error or a bad tar: classified by _transient
            failure.append(exn)
        finally:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close; it is dropped either way
                pass

    def exact_samples(self, slices) -> Iterator[dict | None]:
        """Samples of the slices in order, through a seeded shuffle buffer; ``None`` marks a lost sample."""
        return self._shuffle(self._exact_raw(slices))

    def _exact_raw(self, slices) -> Iterator[dict | None]:
        """One item per planned sample, in plan order. Slices that follow each other in one shard (after an elastic
        resume a worker's share has holes) are read in one pass of the shard instead of reopening it per slice."""
        for url, runs in _passes(slices):
            wanted = sum(stop - start for start, stop in runs)
            got, k = 0, 0
            for pos, sample in enumerate(self._shard_samples(url)):
                while k < len(runs) and pos >= runs[k][1]:
                    k += 1
                if k == len(runs):
                    break
                if pos >= runs[k][0]:
                    got += 1
                    yield sample
            for _ in range(wanted - got):  # truncated/corrupt shard: samples lost
                self._note_error(url, self.last_error.get(url, "shard ended early"))
                yield None

    def resampled_samples(self) -> Iterator[dict | None]:
        s = self.s
        weights = shard_weights(s.source_of_shard, s.sizes, s.source_weights)

        def forever():
            while True:
                url = self.rng.choices(s.urls, weights=weights)[0]
                yield from self._shard_samples(url)

        return self._shuffle(forever())

    def _shuffle(self, it: Iterator) -> Iterator:
        """The worker's seeded shuffle buffer (data/plan.py: its order is a function of the plan, so that a resume
        can replay it)."""
        size = self.s.shuffle_buffer if self.s.shuffle else 0
        return shuffle_buffer(it, self.order_rng, size, self.s.shuffle_initial)

    # ---- decoding and batching ---------------------------------------------------------------------------------
    def _note_error(self, url: str, reason: str) -> None:
        url, reason = redact(url), redact(reason)
        self.last_bad = (url, reason)
        self.skipped += 1
        self.skipped_since_batch += 1
        seen = self.read + self.skipped
        if self.read == 0 and self.skipped >= self.s.max_leading_bad:
            raise DataError(
                f"the first {self.skipped} samples of worker {self.worker_id} were all bad; is this a WebDataset "
                f"shard of images with captions? Last bad shard {url}: {reason}"
            )
        if seen >= self.s.min_samples_for_skip_check and self.skipped / seen > self.s.max_skip_fraction:
            raise DataError(
                f"{self.skipped} of {seen} samples skipped in worker {self.worker_id} "
                f"(> data.max_skip_fraction={self.s.max_skip_fraction}); last bad shard {url}: {reason}"
            )

    def _decode(self, sample: dict | None) -> tuple | None:
        if sample is None:
            return None
        url = sample.get("__url__", self.current_url)
        try:
            image_bytes = pick(sample, IMAGE_EXTS)
            if image_bytes is None:
                raise SampleError("no image")
            text_bytes = pick(sample, TEXT_EXTS)
            if text_bytes is None:
                raise SampleError("no caption")
            meta = decode_meta(sample.get("json"))
            caption = decode_text(text_bytes)
            captions = meta.get("captions")
            if self.s.random_caption and isinstance(captions, list) and captions:
                caption = str(self.rng.choice([caption, *captions]))
            image = self.s.transform(decode_image(image_bytes, self.s.image_size))
        except SampleError as err:
            self._note_error(url, f"{sample.get('__key__')}: {err}")
            return None
        self.read += 1
        labels = self.s.vocab.encode(sample_labels(meta)) if self.s.vocab is not None else None
        return image, caption, labels, sample.get("__key__", "")

    def batches(self, raw: Iterator, n_batches: int) -> Iterator[dict]:
        """``n_batches`` batches; the last may be short where the plan says so (equally on every rank)."""
        last_good, pending = None, 0
        for _ in range(n_batches):
            items = []
            while len(items) < self.s.batch_size:
                if pending and last_good is not None:
                    items.append(last_good)
                    pending -= 1
                    continue
                sample = next(raw, _END)
                if sample is _END:
                    break
                decoded = self._decode(sample)
                if decoded is None:
                    if self.s.mode == "resampled":
                        continue  # an infinite stream: just draw another sample
                    pending += 1  # exact: fill the slot so every rank keeps the planned batch shape
                    continue
                last_good = decoded
                items.append(decoded)
            if not items:
                if self.read == 0 and self.skipped:
                    # Without this, an epoch of bad samples yields nothing and the next epoch starts, forever.
                    url, reason = self.last_bad
                    raise DataError(
                        f"no good sample in {self.skipped} read by worker {self.worker_id} this epoch; "
                        f"last bad shard {url}: {reason}"
                    )
                return
            yield self._collate(items)

    def _collate(self, items: list[tuple]) -> dict:
        # What torch.stack of the PILToTensor pixels and self.s.tokenizer(captions) return, with less per-sample
        # Python (see them): the transform hands on PIL images (pixels_transform(tensor=False) in datamodule).
        from medclip_train.data.decode import tokenize
        from medclip_train.data.pixels import SLOT_KEY, stack_pixels

        in_worker = get_worker_info() is not None
        slots = self.s.pixel_slots if in_worker else None
        allocate = functools.partial(slots.take, self.worker_id) if slots is not None else None
        images = stack_pixels([it[0] for it in items], allocate)
        slot = slots.slot_of(images) if slots is not None else None
        text = tokenize(self.s.tokenizer, [it[1] for it in items])
        # A caption whose ids reach the last position of the padded context was cut (or fits it exactly).
        at_context = int((text[:, -1] != self.s.pad_token_id).sum())
        if self.s.trim_padding:
            # Trailing pads are masked out in the text tower, so cutting them is exact and saves compute.
            lengths = (text != self.s.pad_token_id).sum(dim=1)
            # contiguous: a strided view would be copied through a temporary when pinned for the device.
            text = text[:, : max(int(lengths.max()), 1)].contiguous()
        batch = {
            "image": images,
            "text": _ByValue(text) if in_worker else text,
            "key": [it[3] for it in items],
            # Counters as Python ints, not tensors: each tensor of a batch reaches the main process through its own
            # shared-memory handle and socket connection (about 0.2 ms of the main process each, per batch).
            "skipped": self.skipped_since_batch,
            "read_retries": self.retries_since_batch,
            "captions_at_context": at_context,
        }
        if slot is not None:
            batch[SLOT_KEY] = (self.worker_id, slot)
        self.skipped_since_batch = 0
        self.retries_since_batch = 0
        if items[0][2] is not None:
            labels = torch.stack([it[2] for it in items])
            batch["labels"] = _ByValue(labels) if in_worker else labels
        return batch


class _ByValue:
    """A small tensor of a worker's batch that reaches the main process inside the batch's pickle, as a plain
    tensor again. A tensor itself travels as a new shared-memory block that the worker creates and the main process
    receives over a socket connection of its own (about 0.3 ms of each per tensor); the few KB of token ids are
    cheaper copied. Only for batches that leave a worker process: unpickling is what turns it back into a tensor."""

    def __init__(self, tensor: torch.Tensor):
        self.array = tensor.numpy()

    def __reduce__(self):
        return (torch.from_numpy, (self.array,))


def _passes(slices) -> Iterator[tuple[str, list[tuple[int, int]]]]:
    """Consecutive slices of one shard with ascending offsets, as (url, [(start, stop), ...]) per pass."""
    url, runs = None, []
    for sl in slices:
        if sl.url != url or (runs and sl.start < runs[-1][1]):
            if runs:
                yield url, runs
            url, runs = sl.url, []
        runs.append((sl.start, sl.stop))
    if runs:
        yield url, runs


def _open_shard(url: str):
    """A binary stream of the shard: fsspec for remote URLs (streamed in one request for http, as curl would),
    webdataset's gopen for local files and ``pipe:`` commands."""
    if not is_fsspec_url(url):
        return gopen(url)
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    # http(s): block_size=0 is one streaming GET; the default would send a HEAD and then range requests.
    kwargs = {"block_size": 0} if fs.protocol and set(fs.protocol) & {"http", "https"} else {}
    return fs.open(path, "rb", **kwargs)


_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}


def _transient(exn: BaseException) -> bool:
    """Whether a read error may go away on a retry (network trouble, an overloaded server)."""
    if isinstance(exn, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    if isinstance(exn, (ConnectionError, TimeoutError)):
        return True
    status = getattr(exn, "status", None) or getattr(exn, "status_code", None)
    if isinstance(status, int):
        return status in _TRANSIENT_STATUS
    module = type(exn).__module__ or ""
    # aiohttp (fsspec http): payload cut short, server disconnected; botocore/urllib3 (s3fs): connection errors.
    return module.startswith(("aiohttp", "botocore", "urllib3", "requests")) or (
        exn.__cause__ is not None and _transient(exn.__cause__)
    )
