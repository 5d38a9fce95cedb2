"""The training/validation sample stream: shards -> samples -> decoded, transformed, tokenized batches.

Runs inside DataLoader workers. Batching happens in the worker (``batch_size=None`` in the DataLoader) so the
tokenizer runs once per batch on a list of captions, which is several times faster than per sample.

Bad samples (undecodable image, missing or empty or non-UTF-8 caption) and the samples lost to a truncated or
corrupt shard are skipped and counted. To keep batch shapes equal on every rank (the contrastive loss gathers
features across ranks), a skipped sample's slot is filled with the previous good sample of the same worker,
so an epoch still has exactly the planned number of batches. Past ``max_skip_fraction`` the run stops with an
error naming the shard.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from medclip_train.data.decode import IMAGE_EXTS, TEXT_EXTS, SampleError, decode_image, decode_meta, decode_text, pick
from medclip_train.data.labels import LabelVocab, sample_labels
from medclip_train.data.plan import (
    consumed_per_worker,
    exact_worker_batches,
    exact_worker_slices,
    resampled_worker_batches,
    shard_weights,
)

_END = object()


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
    # Set by the DataLoader in the main process before workers start (see datamodule.StreamLoader).
    epoch: int = 0
    skip_batches: int = 0
    restarts: int = 0
    num_workers: int = 1
    world: tuple[int, int] = field(default_factory=lambda: (0, 1))


class ShardStream(IterableDataset):
    def __init__(self, spec: StreamSpec):
        super().__init__()
        self.spec = spec

    def batches_per_worker(self) -> list[int]:
        s = self.spec
        rank, world_size = s.world
        if s.mode == "exact":
            return exact_worker_batches(sum(s.sizes), world_size, s.batch_size, max(s.num_workers, 1))
        return resampled_worker_batches(s.samples_per_epoch, world_size, s.batch_size, max(s.num_workers, 1))

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
        # Exact mode replays its epoch plan after a resume, so its shuffle must not depend on the restart count;
        # resampled mode must draw a new stream after a resume, so there it does.
        restarts = spec.restarts if spec.mode == "resampled" else 0
        self.rng = random.Random(hash((spec.seed, spec.epoch, rank, worker_id, restarts)))
        self.worker_id = worker_id
        self.read = 0
        self.skipped = 0
        self.skipped_since_batch = 0
        self.last_error: dict[str, str] = {}
        self.last_bad = ("", "")
        self.current_url = ""

    # ---- raw samples -------------------------------------------------------------------------------------------
    def _shard_samples(self, url: str) -> Iterator[dict]:
        self.current_url = url

        def handler(exn: Exception) -> bool:
            self.last_error[url] = f"{type(exn).__name__}: {exn}"
            return True  # keep going; losses are counted against the shard's expected size

        files = tar_file_expander(url_opener([{"url": url}], handler=handler), handler=handler)
        for sample in group_by_keys(files, handler=handler):
            if sample:  # webdataset 1.x emits an empty end-of-shard marker
                yield sample

    def exact_samples(self, slices) -> Iterator[dict | None]:
        """Samples of the slices in order, through a seeded shuffle buffer; ``None`` marks a lost sample."""
        return self._shuffle(self._exact_raw(slices))

    def _exact_raw(self, slices) -> Iterator[dict | None]:
        for sl in slices:
            got = 0
            for pos, sample in enumerate(self._shard_samples(sl.url)):
                if pos < sl.start:
                    continue
                if pos >= sl.stop:
                    break
                got += 1
                yield sample
            for _ in range(sl.stop - sl.start - got):  # truncated/corrupt shard: samples lost
                self._note_error(sl.url, self.last_error.get(sl.url, "shard ended early"))
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
        """A seeded shuffle buffer that starts yielding once ``shuffle_initial`` samples are in and then grows to
        ``shuffle_buffer`` by reading two samples per sample it yields (webdataset's ``shuffle(bufsize, initial)``).
        Filling the whole buffer first stalled every epoch start: each worker read ``shuffle_buffer`` raw samples
        (5000 in the pretraining config, 64 workers a node) before its first batch. Every sample is still yielded
        exactly once, and the order depends on the seed only, so a resume replays it."""
        size = self.s.shuffle_buffer if self.s.shuffle else 0
        if size <= 1:
            yield from it
            return
        initial = max(1, min(self.s.shuffle_initial, size))
        buf = []
        for item in it:
            buf.append(item)
            if len(buf) < size:
                extra = next(it, _END)
                if extra is not _END:
                    buf.append(extra)
            if len(buf) >= initial:
                j = self.rng.randrange(len(buf))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        self.rng.shuffle(buf)
        yield from buf

    # ---- decoding and batching ---------------------------------------------------------------------------------
    def _note_error(self, url: str, reason: str) -> None:
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
        images = torch.stack([it[0] for it in items])
        text = self.s.tokenizer([it[1] for it in items])
        if self.s.trim_padding:
            # Trailing pads are masked out in the text tower, so cutting them is exact and saves compute.
            lengths = (text != self.s.pad_token_id).sum(dim=1)
            # contiguous: a strided view would be copied through a temporary when pinned for the device.
            text = text[:, : max(int(lengths.max()), 1)].contiguous()
        batch = {
            "image": images,
            "text": text,
            "key": [it[3] for it in items],
            "skipped": torch.tensor(self.skipped_since_batch),
        }
        self.skipped_since_batch = 0
        if items[0][2] is not None:
            batch["labels"] = torch.stack([it[2] for it in items])
        return batch
