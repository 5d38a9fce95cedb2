"""What a converter yields, and the checks every record passes before its image is touched.

A converter turns one dataset release into a stream of :class:`Record` (a candidate sample) and :class:`Rejection`
(an input record that cannot become a sample, with the reason). The writer counts both, so every input record ends up
either written or rejected: nothing is dropped silently.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any


class PrepError(Exception):
    """Bad command-line input (missing folder, no captions file): reported as one line, exit code 2."""


class Reason:
    """Rejection reasons, as written to ``rejected.jsonl`` and counted in ``manifest.json``."""

    MISSING_IMAGE = "missing_image"
    UNREADABLE_IMAGE = "unreadable_image"
    TRUNCATED_IMAGE = "truncated_image"
    DECOMPRESSION_BOMB = "decompression_bomb"
    EMPTY_CAPTION = "empty_caption"
    UNDECODABLE_TEXT = "undecodable_text"
    CAPTION_TOO_SHORT = "caption_too_short"
    DUPLICATE_ID = "duplicate_id"
    DUPLICATE_IMAGE = "duplicate_image"
    PATH_ESCAPE = "path_escape"
    MALFORMED_RECORD = "malformed_record"
    UNSUPPORTED_FILE = "unsupported_file"


class RecordRejected(Exception):
    """Raised by readers' helpers; the reader turns it into a :class:`Rejection`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Record:
    """One input record that may become a sample.

    Attributes:
        source: dataset name written to the sample's ``.json`` (``"roco"``, ``"medicat"``...).
        id: the record's id in the release; unique within ``source``.
        split: output split, ``train``, ``val`` or ``test``.
        caption: caption text; raw bytes when the reader could not decode them (rejected as undecodable text);
            ``None`` when the release has no caption for it (rejected as empty).
        image: where the pixels come from: a file ``Path``, encoded ``bytes``, an :class:`~data_prep.images.ArrayImage`
            or an object with ``render()`` (see :func:`data_prep.images.process_image`).
        source_file: the file the record was read from, for ``rejected.jsonl``.
        meta: further ``.json`` fields: ``modality``, ``cuis``, ``labels``, ``licence`` and source-specific extras.
        line: 1-based line (or row) number in ``source_file`` when there is one.
    """

    source: str
    id: str
    split: str
    caption: str | bytes | None
    image: Any
    source_file: str
    meta: dict[str, Any] = field(default_factory=dict)
    line: int | None = None


@dataclass
class Rejection:
    """An input record that does not become a sample, and why."""

    source: str
    id: str | None
    source_file: str
    reason: str
    detail: str = ""
    line: int | None = None
    split: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``rejected.jsonl`` line for this rejection (empty optional fields left out)."""
        row: dict[str, Any] = {"id": self.id, "source": self.source, "source_file": self.source_file}
        row["reason"] = self.reason
        if self.detail:
            row["detail"] = self.detail
        if self.line is not None:
            row["line"] = self.line
        if self.split is not None:
            row["split"] = self.split
        return row


def reject(record: Record, reason: str, detail: str = "") -> Rejection:
    """The rejection of ``record`` with ``reason``."""
    return Rejection(record.source, record.id, record.source_file, reason, detail, record.line, record.split)


def clean_caption(caption: str | bytes | None, min_words: int = 0) -> tuple[str | None, str | None]:
    """Check and normalise a caption.

    Leading and trailing whitespace is stripped (ROCO captions start with a space; CSV cells end with stray blanks);
    everything inside is kept byte for byte.

    Returns:
        ``(caption, None)`` when it is usable, ``(None, reason)`` when not.
    """
    if caption is None:
        return None, Reason.EMPTY_CAPTION
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError:
            return None, Reason.UNDECODABLE_TEXT
    if not isinstance(caption, str):
        return None, Reason.MALFORMED_RECORD
    try:
        # Lone surrogates come from files read with errors="surrogateescape" or from JSON "\udXXX" escapes:
        # they cannot be written as UTF-8, so the text was never valid.
        caption.encode("utf-8")
    except UnicodeEncodeError:
        return None, Reason.UNDECODABLE_TEXT
    caption = caption.strip()
    if not caption:
        return None, Reason.EMPTY_CAPTION
    if min_words and len(caption.split()) < min_words:
        return None, Reason.CAPTION_TOO_SHORT
    return caption, None


_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


def relative_parts(relative: str, root: object) -> tuple[str, ...]:
    """The parts of a path taken from a record, after the lexical checks (no file system access).

    Raises:
        RecordRejected: ``path_escape`` for absolute paths or ``..`` components, ``malformed_record`` for empty ones.
    """
    if not isinstance(relative, str) or not relative.strip():
        raise RecordRejected(Reason.MALFORMED_RECORD, "empty image path")
    posix = relative.replace("\\", "/")
    if posix.startswith("/") or _WINDOWS_DRIVE.match(posix):
        raise RecordRejected(Reason.PATH_ESCAPE, f"absolute path {relative!r}")
    if ".." in PurePosixPath(posix).parts:
        raise RecordRejected(Reason.PATH_ESCAPE, f"path {relative!r} leaves {root}")
    return PurePosixPath(posix).parts


@functools.lru_cache(maxsize=256)
def _real(root: Path) -> Path:
    # Resolved once per root: it is joined with every record of a release.
    return root.resolve()


def escapes(path: Path, root: Path) -> Path | None:
    """Where ``path`` really leads (every symbolic link resolved) when that is outside ``root``; else ``None``.

    ``root`` is resolved too, so a root that is itself a link (a common way to place a large image folder) works.
    """
    real = path.resolve()
    return None if real.is_relative_to(_real(root)) else real


def safe_join(root: Path, relative: str) -> Path:
    """Join a path taken from a record to the folder it must stay in.

    Record paths come from files users downloaded: a crafted ``../`` or absolute path, or a symbolic link inside the
    folder (to a file or to a folder), must not make the converter read (and publish in a shard) a file outside the
    dataset. The lexical checks come first, then the joined path is resolved and must stay inside the resolved root.

    Raises:
        RecordRejected: ``path_escape`` for absolute paths, ``..`` components and links leading outside ``root``,
            ``malformed_record`` for empty ones.
    """
    path = root.joinpath(*relative_parts(relative, root))
    real = escapes(path, root)
    if real is not None:
        raise RecordRejected(Reason.PATH_ESCAPE, f"{relative!r} leads to {real} through a link, outside {root}")
    return path


_KEY_UNSAFE = re.compile(r"[^0-9A-Za-z_-]+")
MAX_KEY_LENGTH = 120


def sample_key(source: str, record_id: str) -> str:
    """A webdataset-safe key for a record: ``{source}_{id}`` with everything but ``[0-9A-Za-z_-]`` replaced.

    Webdataset splits a member name at the first dot of its basename (``key.ext``), so a dot or slash in a key would
    split one sample into several. Long keys are cut and given a hash so they stay unique.
    """
    key = _KEY_UNSAFE.sub("_", f"{source}_{record_id}").strip("_")
    if len(key) > MAX_KEY_LENGTH:
        key = f"{key[: MAX_KEY_LENGTH - 17]}_{short_hash(record_id)}"
    return key


def short_hash(text: str) -> str:
    """16 hex digits of BLAKE2b of ``text``: stable across runs and machines (unlike ``hash()``)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def hashed_split(group: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split for releases without official splits.

    The split depends only on ``(seed, group)``, not on record order, so adding records never moves old ones between
    splits; passing a paper id as ``group`` keeps all figures of one paper in the same split.
    """
    if not (val_fraction or test_fraction):
        return "train"
    digest = hashlib.blake2b(f"{seed}:{group}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def read_jsonl_rows(path: Path, source: str):
    """Yield ``(line_number, row_dict)`` or a :class:`Rejection` for each non-blank line of a JSONL file.

    Lines are decoded one by one so a single bad line (not UTF-8, not JSON, not an object) costs one record only.
    """
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield Rejection(source, None, str(path), Reason.UNDECODABLE_TEXT, "line is not UTF-8", number)
                continue
            except json.JSONDecodeError as e:
                yield Rejection(source, None, str(path), Reason.MALFORMED_RECORD, f"invalid JSON: {e}", number)
                continue
            if not isinstance(row, dict):
                yield Rejection(source, None, str(path), Reason.MALFORMED_RECORD, "not a JSON object", number)
                continue
            yield number, row
