"""The writer shared by all converters: shards, rejections, ``sizes.json`` and ``manifest.json``.

Output folder layout (what open_clip's ``--train-data 'OUT/train-{000000..000003}.tar'`` reads unchanged)::

    OUT/{split}-{NNNNNN}.tar   samples: {key}.jpg|png, {key}.txt (caption), {key}.json (metadata)
    OUT/sizes.json             shard basename -> sample count
    OUT/manifest.json          counts per split/source, rejections per reason, label_counts, converter options
    OUT/rejected.jsonl         one line per rejected input record

Every file is written under a ``.tmp`` name and renamed into place when complete, and ``sizes.json`` then
``manifest.json`` come last: a folder without ``manifest.json`` is an interrupted conversion.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import sys
import tarfile
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_prep.images import EncodedImage, ImageFailure, ImagePolicy, process_image
from data_prep.records import PrepError, Reason, Record, Rejection, clean_caption, reject, sample_key, short_hash
from data_prep.tokenizer import DEFAULT_VOCAB_SIZE, WordCounts, checked_vocab, save_tokenizer
from medclip_train.atomic_files import AtomicFile, atomic_write_json

FORMAT_VERSION = 1
SPLIT_ORDER = ("train", "val", "test")
# Fixed member mtime: the same input gives byte-identical shards.
_MTIME = 0
# Written first into an output folder and removed once manifest.json is in place: it vouches that the folder's
# shard-named files are this tool's while no manifest lists them yet (an interrupted or running conversion).
MARKER = ".medclip-prep.json"
# Names this tool writes into an output folder (each also as NAME.tmp while being written). Only these are ever
# removed by --overwrite, and only when the folder's manifest or marker says medclip-prep wrote them.
_SHARD_NAME = re.compile(r"[0-9A-Za-z_]+-[0-9]{6}\.tar")
_OUR_FILES = ("sizes.json", "manifest.json", "rejected.jsonl", MARKER)
_OUR_FOLDERS = ("zeroshot", "tokenizer")


@dataclass(frozen=True)
class WriteOptions:
    """Options common to every converter (the shared command-line flags).

    Attributes:
        samples_per_shard: samples per tar before a new shard is started.
        max_image_side: longest image side after resizing, keeping aspect; never upscales; ``None`` keeps sizes.
        jpeg_quality: quality of re-encoded JPEGs (source JPEGs that need no resize keep their bytes).
        workers: processes decoding/encoding images; output order does not depend on it.
        dedupe: reject images whose decoded pixels equal an earlier sample's.
        min_caption_words: reject captions with fewer whitespace-separated words.
        seed: seed for shuffling and for hashed splits.
        shuffle: shuffle records (within each split) before writing, so shards mix the release's order.
        overwrite: replace an earlier conversion in the output folder instead of refusing.
        quiet: no progress bar.
        tokenizer: folder to save a WordPiece tokenizer of the written train captions into (``None``: no tokenizer).
        vocab_size: the tokenizer's largest vocabulary.
    """

    samples_per_shard: int = 5000
    max_image_side: int | None = None
    jpeg_quality: int = 95
    workers: int = 1
    dedupe: bool = False
    min_caption_words: int = 0
    seed: int = 0
    shuffle: bool = False
    overwrite: bool = False
    quiet: bool = False
    tokenizer: Path | None = None
    vocab_size: int = DEFAULT_VOCAB_SIZE

    def __post_init__(self):
        if self.samples_per_shard < 1:
            raise PrepError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if self.max_image_side is not None and self.max_image_side < 8:
            raise PrepError(f"--max-image-side must be >= 8, got {self.max_image_side}")
        if not 1 <= self.jpeg_quality <= 100:
            raise PrepError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")
        if self.workers < 1:
            raise PrepError(f"--workers must be >= 1, got {self.workers}")
        if self.min_caption_words < 0:
            raise PrepError(f"--min-caption-words must be >= 0, got {self.min_caption_words}")

    def content_options(self) -> dict[str, Any]:
        """The options that change the shards (for the manifest; workers/overwrite/quiet do not, and the tokenizer is
        recorded under ``extras``)."""
        skip = ("workers", "overwrite", "quiet", "tokenizer", "vocab_size")
        return {k: v for k, v in asdict(self).items() if k not in skip}


@dataclass
class Summary:
    """What a conversion did; ``written + rejected == read`` always holds."""

    output: Path
    read: int
    written: int
    rejected: int
    rejected_by_reason: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        """The one-line summary every converter prints."""
        return f"written={self.written} rejected={self.rejected} read={self.read}"


def package_version() -> str:
    """The installed medclip-train version, for the manifest."""
    try:
        return metadata.version("medclip-train")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass
class OutputSurvey:
    """What an output folder holds, by who wrote it.

    Attributes:
        ours: an earlier conversion's files and folders: listed in its ``manifest.json``, or named like ours in a
            folder carrying :data:`MARKER`. ``--overwrite`` replaces them.
        in_the_way: named like files this tool writes (a conversion would overwrite them) but vouched for by no
            manifest or marker: someone else's shards or an older tool's leftovers. Never removed.
        others: everything else (the user's downloads, notes): always left alone.
    """

    ours: list[Path] = field(default_factory=list)
    in_the_way: list[Path] = field(default_factory=list)
    others: list[Path] = field(default_factory=list)


def _listed_shards(output: Path) -> set[str] | None:
    """Shard names listed by the folder's medclip-prep ``manifest.json``; ``None`` when there is no such manifest."""
    try:
        manifest = json.loads((output / "manifest.json").read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or "format_version" not in manifest or "name" not in manifest["converter"]:
            return None
        return {str(name) for split in manifest.get("splits", {}).values() for name in split.get("shards", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # absent, unreadable or not ours
        return None


def survey_output(output: Path) -> OutputSurvey:
    """Sort the entries of an existing output folder by who wrote them (see :class:`OutputSurvey`)."""
    listed = _listed_shards(output)
    marked = (output / MARKER).is_file()
    survey = OutputSurvey()
    for path in sorted(output.iterdir()):
        base = path.name.removesuffix(".tmp")
        if _SHARD_NAME.fullmatch(base):
            ours = marked or (listed is not None and base in listed)
        elif base in _OUR_FILES or path.name in _OUR_FOLDERS:
            ours = marked or listed is not None
        else:
            survey.others.append(path)
            continue
        (survey.ours if ours else survey.in_the_way).append(path)
    return survey


def _names(paths: list[Path], limit: int = 5) -> str:
    return ", ".join(p.name for p in paths[:limit]) + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def prepare_output(output: Path, overwrite: bool) -> None:
    """Create the output folder, refusing to mix with an earlier conversion unless ``overwrite``, and mark it.

    Resuming is not attempted: a shard's content depends on everything before it (dedupe, key collisions, shuffling),
    so the only clean restart is from scratch. ``--overwrite`` removes the earlier conversion's files (including
    leftover ``*.tar.tmp`` from a crash), and only those (see :class:`OutputSurvey`): files this tool would overwrite
    but cannot tell it wrote are refused, anything else is left alone and named in a warning.
    """
    if output.exists() and not output.is_dir():
        raise PrepError(f"output {output} exists and is not a folder")
    output.mkdir(parents=True, exist_ok=True)
    found = survey_output(output)
    if found.in_the_way:
        raise PrepError(
            f"output {output} holds {_names(found.in_the_way)}, which medclip-prep would overwrite but no "
            "manifest.json or marker of it lists: move them away or choose another --output"
        )
    if found.ours and not overwrite:
        names = _names(found.ours, 3)
        raise PrepError(f"output {output} already holds a conversion ({names}); pass --overwrite to replace it")
    if overwrite and found.others:
        print(f"medclip-prep: warning: --overwrite left alone {len(found.others)} item(s) in {output} that "
              f"medclip-prep did not write: {_names(found.others)}", file=sys.stderr)  # fmt: skip
    for path in found.ours:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    state = "conversion in progress or interrupted (no manifest.json yet)"
    atomic_write_json(output / MARKER, {"written_by": "medclip-prep", "version": package_version(), "state": state})


class ShardSink:
    """Writes samples into ``{split}-{NNNNNN}.tar`` shards, one open shard per split.

    A shard is written as ``*.tar.tmp`` and renamed when it is full or the run ends, so a ``*.tar`` is always complete.
    """

    def __init__(self, output: Path, samples_per_shard: int):
        self.output = output
        self.samples_per_shard = samples_per_shard
        self.sizes: dict[str, int] = {}
        self.shards: dict[str, list[str]] = defaultdict(list)
        self._open: dict[str, tuple[AtomicFile, tarfile.TarFile, str]] = {}
        self._counts: dict[str, int] = {}

    def add(self, split: str, key: str, members: list[tuple[str, bytes]]) -> None:
        """Append one sample (``(extension, bytes)`` members, image first) to the split's current shard."""
        if split not in self._open:
            self._start(split)
        _, tar, _ = self._open[split]
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), _MTIME, 0o644
            tar.addfile(info, io.BytesIO(data))  # BytesIO over bytes shares the buffer, no copy
        self._counts[split] += 1
        if self._counts[split] >= self.samples_per_shard:
            self._finish(split)

    def close(self) -> dict[str, int]:
        """Finish all open shards; returns ``{shard basename: sample count}``."""
        for split in list(self._open):
            self._finish(split)
        return dict(sorted(self.sizes.items()))

    def abort(self) -> None:
        """Remove the shards still being written (after an error): no half shard is left behind.

        The tar is not closed: that would write its end blocks into a file about to be deleted, and on a full disk
        fail again, hiding the first error and leaving the ``.tmp`` behind.
        """
        for f, _, _ in self._open.values():
            f.abort()
        self._open.clear()

    def _start(self, split: str) -> None:
        name = f"{split}-{len(self.shards[split]):06d}.tar"
        f = AtomicFile(self.output / name, "wb")
        self._open[split] = (f, tarfile.open(fileobj=f.file, mode="w", format=tarfile.PAX_FORMAT), name)
        self._counts[split] = 0

    def _finish(self, split: str) -> None:
        f, tar, name = self._open[split]
        tar.close()
        f.commit()
        del self._open[split]  # only now: if anything above fails, abort() still removes the .tmp
        self.sizes[name] = self._counts[split]
        self.shards[split].append(name)


class _Tally:
    """Counters that become the manifest."""

    def __init__(self):
        self.read: Counter[str] = Counter()
        self.written: dict[str, Counter[str]] = defaultdict(Counter)
        self.rejected_by_source: Counter[str] = Counter()
        self.reasons: Counter[str] = Counter()
        self.labels: dict[str, Counter[str]] = defaultdict(Counter)
        self.modalities: dict[str, Counter[str]] = defaultdict(Counter)

    def count_written(self, record: Record, meta: dict[str, Any]) -> None:
        self.written[record.split][record.source] += 1
        self.labels[record.split].update(meta["labels"])
        self.labels[record.split].update(meta["cuis"])
        if meta.get("modality") is not None:
            self.modalities[record.split][str(meta["modality"])] += 1

    def count_rejected(self, rejection: Rejection) -> None:
        self.rejected_by_source[rejection.source] += 1
        self.reasons[rejection.reason] += 1


class _RejectionLog:
    """``rejected.jsonl``, written as a tmp file and renamed with the rest of the output."""

    def __init__(self, output: Path):
        self.path = output / "rejected.jsonl"
        self._file = AtomicFile(self.path, "w", encoding="utf-8")

    def add(self, rejection: Rejection) -> None:
        self._file.file.write(json.dumps(rejection.to_json(), ensure_ascii=False) + "\n")

    def close(self) -> None:
        self._file.commit()

    def abort(self) -> None:
        self._file.abort()


class _InlineExecutor(Executor):
    """Runs work in the calling process: ``--workers 1`` avoids process start-up and pickling."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def _executor(workers: int) -> Executor:
    if workers <= 1:
        return _InlineExecutor()
    # fork starts workers in milliseconds, but forking a process that runs other threads can deadlock a child on a
    # lock held at fork time: then forkserver (clean workers, about a second to start) is used instead.
    method = "fork" if sys.platform.startswith("linux") and threading.active_count() == 1 else "forkserver"
    if method not in multiprocessing.get_all_start_methods():
        method = "spawn"
    context = multiprocessing.get_context(method)
    owner = (os.getpid(), _start_time(os.getpid()))
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init, initargs=owner)


# A worker blocked on the pool's queue never learns that the converter died of SIGKILL (or of SIGTERM before the
# handler of medclip-prep's CLI, or in a library caller without one): it used to wait there as an orphan. So each
# worker gets a parent-death signal (Linux; the parent is the converter for fork, the forkserver otherwise) and a
# thread that watches the converter itself, which covers forkserver/spawn workers and other systems.
_PR_SET_PDEATHSIG = 1
_WATCH_INTERVAL_S = 0.5


def _start_time(pid: int) -> str | None:
    """The start time of ``pid`` (/proc, Linux): tells the converter from a later process given its pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_alive(pid: int, started: str | None) -> bool:
    if started is not None:  # Linux: a zombie (killed, not yet reaped) or a reused pid is not the converter
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return False
        return fields[0] != "Z" and fields[19] == started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else: cannot be ours, but do not guess
        return True
    return True


def _watch_owner(pid: int, started: str | None) -> None:
    while _owner_alive(pid, started):
        time.sleep(_WATCH_INTERVAL_S)
    os._exit(1)  # workers write nothing: there is nothing to clean up


def _worker_init(owner_pid: int, owner_started: str | None) -> None:
    """Pool worker initializer: die with the converter (see above)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker inherits the CLI's handler, meant for the parent
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # no libc prctl: the watching thread still covers it
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if not _owner_alive(owner_pid, owner_started):  # died before the death signal was set
        os._exit(1)
    threading.Thread(target=_watch_owner, args=(owner_pid, owner_started), daemon=True, name="owner-watch").start()


class _ProgressBar(tqdm):
    """tqdm without its monitor thread, so that worker processes may still be forked."""

    monitor_interval = 0


def sample_json(record: Record, image: EncodedImage) -> dict[str, Any]:
    """The ``.json`` member of a sample: common fields first, then the source's extras, then image facts."""
    extras = dict(record.meta)
    meta: dict[str, Any] = {"source": record.source, "id": record.id, "split": record.split}
    modality = extras.pop("modality", None)
    if modality is not None:
        meta["modality"] = modality
    meta["cuis"] = list(extras.pop("cuis", None) or [])
    meta["labels"] = list(extras.pop("labels", None) or [])
    licence = extras.pop("licence", None)
    if licence:
        meta["licence"] = licence
    meta.update(extras)
    meta["image_info"] = {
        "width": image.width,
        "height": image.height,
        "original_width": image.original_width,
        "original_height": image.original_height,
        "original_mode": image.original_mode,
        "passthrough": image.passthrough,
    }
    return meta


class _Conversion:
    """One run of :func:`write_dataset`: screening, ordered image processing, writing, accounting."""

    def __init__(self, output: Path, options: WriteOptions):
        self.output = output
        self.options = options
        self.policy = ImagePolicy(options.max_image_side, options.jpeg_quality, content_hash=options.dedupe)
        self.tally = _Tally()
        self.sink = ShardSink(output, options.samples_per_shard)
        self.rejections = _RejectionLog(output)
        self.seen_ids: set[tuple[str, str]] = set()
        self.keys: set[str] = set()
        self.hashes: dict[str, str] = {}
        # Words of the written train captions, counted as they go (no caption list kept in memory).
        self.words = WordCounts() if options.tokenizer is not None else None

    def screen(self, items: Iterable[Record | Rejection]) -> Iterator[tuple[Record | Rejection, str | None]]:
        """Cheap checks before any image is decoded: duplicate id, caption."""
        for item in items:
            self.tally.read[item.source] += 1
            if isinstance(item, Rejection):
                yield item, None
                continue
            if (item.source, item.id) in self.seen_ids:
                yield reject(item, Reason.DUPLICATE_ID, f"id {item.id!r} seen before"), None
                continue
            self.seen_ids.add((item.source, item.id))
            caption, reason = clean_caption(item.caption, self.options.min_caption_words)
            yield (reject(item, reason), None) if reason else (item, caption)

    def run(self, items: Iterable[Record | Rejection]) -> None:
        window = max(8, self.options.workers * 8)
        with _executor(self.options.workers) as pool:
            pending: deque[tuple[Record | Rejection, str | None, Future | None]] = deque()
            for item, caption in self.screen(items):
                future = pool.submit(process_image, item.image, self.policy) if caption is not None else None
                pending.append((item, caption, future))
                while len(pending) >= window:
                    self.finish(*pending.popleft())
            while pending:
                self.finish(*pending.popleft())

    def finish(self, item: Record | Rejection, caption: str | None, future: Future | None) -> None:
        """Write or reject one item, in input order."""
        if future is None:
            return self.add_rejection(item)
        result = future.result()
        if isinstance(result, ImageFailure):
            return self.add_rejection(reject(item, result.reason, result.detail))
        if self.options.dedupe and result.content_hash is not None:
            first = self.hashes.setdefault(result.content_hash, item.id)
            if first != item.id:
                return self.add_rejection(reject(item, Reason.DUPLICATE_IMAGE, f"same pixels as {first!r}"))
        self.add_sample(item, caption, result)

    def add_rejection(self, rejection: Rejection) -> None:
        self.tally.count_rejected(rejection)
        self.rejections.add(rejection)

    def add_sample(self, record: Record, caption: str, image: EncodedImage) -> None:
        key = sample_key(record.source, record.id)
        # Distinct ids can sanitise to the same key ("a.b" and "a_b"), and a suffixed key can be another record's own
        # key: retry until unique. Keys are then unique across all shards and splits, which webdataset needs (a key
        # seen again later is read as a separate sample), so conversions have nothing to warn about.
        base, salt = key, record.source + chr(0) + record.id
        while key in self.keys:
            key = f"{base}_{short_hash(salt)}"  # the first suffix is the one earlier versions gave
            salt += chr(0)
        self.keys.add(key)
        meta = sample_json(record, image)
        members = [(image.ext, image.data), ("txt", caption.encode("utf-8"))]
        members.append(("json", json.dumps(meta, ensure_ascii=False).encode("utf-8")))
        self.sink.add(record.split, key, members)
        self.tally.count_written(record, meta)
        if self.words is not None and record.split == "train":
            # The caption and the alternatives the training stream draws from (meta["captions"]).
            self.words.update([caption, *(c for c in meta.get("captions") or [] if isinstance(c, str))])

    def tokenizer(self) -> dict[str, Any]:
        """Build the tokenizer of the counted train captions; what the manifest records about it."""
        path = self.options.tokenizer
        shown = path.relative_to(self.output).as_posix() if path.is_relative_to(self.output) else str(path)
        if not self.words.captions:
            return {"path": shown, "written": False, "why": "no train captions"}
        vocab = save_tokenizer(checked_vocab(self.words, self.options.vocab_size), path)
        return {"path": shown, "written": True, "vocab_size": vocab, "captions": self.words.captions}

    def manifest(self, converter: str, converter_options: dict[str, Any]) -> dict[str, Any]:
        tally = self.tally
        written = sum(sum(c.values()) for c in tally.written.values())
        rejected = sum(tally.reasons.values())
        splits = sorted(set(tally.written) | set(self.sink.shards), key=split_sort_key)
        sources = sorted(tally.read)
        return {
            "format_version": FORMAT_VERSION,
            "version": package_version(),
            "converter": {"name": converter, "options": {**converter_options, **self.options.content_options()}},
            "counts": {"read": sum(tally.read.values()), "written": written, "rejected": rejected},
            "splits": {
                s: {
                    "written": sum(tally.written[s].values()),
                    "shards": self.sink.shards.get(s, []),
                    "sources": dict(sorted(tally.written[s].items())),
                }
                for s in splits
            },
            "sources": {
                src: {
                    "read": tally.read[src],
                    "written": sum(tally.written[s][src] for s in tally.written),
                    "rejected": tally.rejected_by_source[src],
                }
                for src in sources
            },
            "rejected": dict(sorted(tally.reasons.items())),
            "label_counts": {s: _by_count(tally.labels[s]) for s in splits if tally.labels[s]},
            "modality_counts": {s: _by_count(tally.modalities[s]) for s in splits if tally.modalities[s]},
        }


def split_sort_key(split: str) -> tuple[int, str]:
    """Sort key putting train, val, test first, other split names after, by name."""
    return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER), split)


def _by_count(counter: Counter[str]) -> dict[str, int]:
    """Most frequent first, ties by name: the order the label vocabulary is built in."""
    return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


def _progress(items: Iterable, total: int | None, desc: str, quiet: bool) -> Iterable:
    disable = quiet or not sys.stderr.isatty()
    return _ProgressBar(items, total=total, desc=desc, unit="rec", file=sys.stderr, disable=disable, dynamic_ncols=True)


def write_dataset(
    items: Iterable[Record | Rejection],
    output: Path,
    options: WriteOptions,
    converter: str,
    converter_options: dict[str, Any] | None = None,
    total: int | None = None,
    finalize: Callable[[Path], dict[str, Any]] | None = None,
) -> Summary:
    """Write a converter's records as shards, accounting for every one of them.

    Args:
        items: the converter's records and reader-level rejections, in release order.
        output: output folder (created; an earlier conversion there is refused unless ``options.overwrite``).
        options: the common options.
        converter: converter name for the manifest (``"roco"``).
        converter_options: the converter's own options for the manifest (paths as strings).
        total: number of items if known, for the progress bar.
        finalize: writes extra outputs (zero-shot folders, tokenizer) after the shards and before ``sizes.json`` and
            ``manifest.json``, so that the manifest still marks a complete folder; what it returns is kept in the
            manifest under ``extras``.

    Returns:
        Counts of what was read, written and rejected.
    """
    prepare_output(output, options.overwrite)
    if options.shuffle:
        items = list(items)
        random.Random(options.seed).shuffle(items)
    run = _Conversion(output, options)
    try:
        run.run(_progress(items, total, converter, options.quiet))
        sizes = run.sink.close()
        run.rejections.close()
    except BaseException:
        run.sink.abort()
        run.rejections.abort()
        raise
    manifest = run.manifest(converter, converter_options or {})
    if options.tokenizer is not None:
        manifest["extras"] = {"tokenizer": run.tokenizer()}
    if finalize is not None:
        manifest["extras"] = {**manifest.get("extras", {}), **finalize(output)}
    atomic_write_json(output / "sizes.json", sizes)
    atomic_write_json(output / "manifest.json", manifest)
    (output / MARKER).unlink()  # the manifest now says which files are ours
    counts = manifest["counts"]
    return Summary(output, counts["read"], counts["written"], counts["rejected"], manifest["rejected"])
