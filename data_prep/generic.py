"""Generic sources for researchers bringing a new modality: a CSV or JSONL table, or an image folder by class.

- table (CSV/JSONL): one row per image, with an image path column and a caption column (names given by flags);
  optional id, split, labels and modality columns. Image paths are relative to ``--images`` (a folder, ``.zip`` or
  ``.tar``; default: the table's folder); absolute paths and ``..`` are refused. A name without an image extension
  (``MPX1024_synpic40275``) is looked up with each usual extension (``.png``, ``.jpg``...), as releases that key
  records by image id need. JSONL fields may be dotted paths into nested objects (``Description.Caption``; a key
  that itself holds the dot wins); a caption field may hold a list of captions: the first becomes the sample's
  ``.txt``, the others its ``.json`` ``captions`` (the training stream draws one of them all per epoch). A record
  missing the image, caption, id or split field is rejected naming the field; a missing labels or modality field
  leaves them empty (sparse columns are common). One table per split: ``read_csv``/``read_jsonl`` with ``split``.
- image folder: ``root/<class>/*`` (or ``root/{train,val,test}/<class>/*``); captions from templates with ``{c}``
  (CLIP_benchmark's placeholder; ``{label}`` also works) replaced by the class's display name; labels
  ``["<source>:<class>"]``.
"""

from __future__ import annotations

import csv
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.image_store import ArchiveStore, FolderStore, open_image_store
from data_prep.records import (
    PrepError,
    Reason,
    Record,
    RecordRejected,
    Rejection,
    clean_caption,
    escapes,
    hashed_split,
    read_jsonl_rows,
    short_hash,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
# Tried in this order for an image name without extension, lower then upper case (Linux file names are case-sensitive).
TRIED_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif")
_ABSENT = object()
SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}
ImageStore = FolderStore | ArchiveStore
DEFAULT_TEMPLATES = ("an image of {c}.", "a medical image showing {c}.", "{c}.")


@dataclass(frozen=True)
class TableColumns:
    """Which columns (CSV) or fields (JSONL) hold what.

    Attributes:
        image: image path, relative to the image root.
        caption: caption text.
        id: record id; defaults to the image path.
        split: ``train``/``val``/``test`` (also ``valid``, ``validation``...); else hashed split by id.
        labels: class labels, a list (JSONL) or a ``label_separator``-separated string.
        modality: modality per row.
    """

    image: str
    caption: str
    id: str | None = None
    split: str | None = None
    labels: str | None = None
    modality: str | None = None


@dataclass(frozen=True)
class SourceInfo:
    """What is known about a generic source as a whole.

    Attributes:
        name: ``source`` written to each sample's ``.json``.
        modality: modality of every sample, unless a modality column says otherwise.
        licence: licence of every sample.
        val_fraction: share of records hashed into ``val`` when there is no split column or folder.
        test_fraction: share of records hashed into ``test``.
        seed: seed of the hashed split and of template choice.
    """

    name: str
    modality: str | None = None
    licence: str | None = None
    val_fraction: float = 0.0
    test_fraction: float = 0.0
    seed: int = 0


def read_csv(
    path: Path,
    columns: TableColumns,
    info: SourceInfo,
    images: Path | None = None,
    delimiter: str = ",",
    label_separator: str = ";",
    split: str | None = None,
) -> Iterator[Record | Rejection]:
    """Records of a CSV table, one per row; the file and its header are checked now.

    Column names are the header's, literally (a CSV has no nesting). ``split``: every row goes to that split (one
    table per split), instead of the split column or the hashed split.
    """
    if not path.is_file():
        raise PrepError(f"CSV file {path} does not exist")
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        _check_columns(path, next(csv.reader(f, delimiter=delimiter), []), columns)
    store = open_image_store(images or path.parent)
    return _csv_records(path, columns, info, store, delimiter, label_separator, split)


def _csv_records(path, columns, info, store, delimiter, label_separator, split) -> Iterator[Record | Rejection]:
    # surrogateescape keeps reading past bytes that are not UTF-8; only the affected row is rejected.
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for row in reader:
            if None in row.values():
                yield Rejection(info.name, None, str(path), Reason.MALFORMED_RECORD, "short row", reader.line_num)
                continue
            yield _table_record(row, reader.line_num, str(path), columns, info, store, label_separator, split)


def read_jsonl(
    path: Path,
    columns: TableColumns,
    info: SourceInfo,
    images: Path | None = None,
    label_separator: str = ";",
    split: str | None = None,
) -> Iterator[Record | Rejection]:
    """Records of a JSONL table, one per line; the file and the fields of its first record are checked now.

    Fields may be dotted paths (``Description.Caption``). ``split``: every record goes to that split.
    """
    if not path.is_file():
        raise PrepError(f"JSONL file {path} does not exist")
    first = next((item for item in read_jsonl_rows(path, info.name) if not isinstance(item, Rejection)), None)
    if first is not None:  # only image and caption: other fields may be missing from some rows
        missing = [c for c in (columns.image, columns.caption) if field_value(first[1], c) is _ABSENT]
        if missing:
            has = ", ".join(_field_paths(first[1])[:30])
            raise PrepError(f"{path}: the first record has no field {', '.join(missing)} (has: {has})")
    store = open_image_store(images or path.parent)
    return _jsonl_records(path, columns, info, store, label_separator, split)


def _jsonl_records(path, columns, info, store, label_separator, split) -> Iterator[Record | Rejection]:
    for item in read_jsonl_rows(path, info.name):
        if isinstance(item, Rejection):
            yield item
            continue
        number, row = item
        yield _table_record(row, number, str(path), columns, info, store, label_separator, split)


def field_value(row: dict[str, Any], path: str) -> Any:
    """The value of column/field ``path`` in ``row``, or ``_ABSENT``.

    The key itself first (CSV headers and flat JSON keys may contain dots), else a dotted path through nested
    objects, a number indexing a list (``Description.Caption``, ``captions.0``).
    """
    if path in row:
        return row[path]
    value: Any = row
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _ABSENT
    return value


def _field_paths(row: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted paths of a record's fields, for the error that says which fields there are."""
    paths = []
    for key, value in row.items():
        path = f"{prefix}{key}"
        paths += _field_paths(value, f"{path}.") if isinstance(value, dict) and value else [path]
    return paths


def _check_columns(path: Path, fieldnames: list[str], columns: TableColumns) -> None:
    wanted = [c for c in (columns.image, columns.caption, columns.id, columns.split, columns.labels) if c]
    missing = [c for c in wanted if c not in fieldnames]
    if missing:
        raise PrepError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(fieldnames)})")


def _table_record(
    row: dict[str, Any],
    line: int,
    src: str,
    cols: TableColumns,
    info: SourceInfo,
    store: ImageStore,
    separator: str,
    file_split: str | None = None,
) -> Record | Rejection:
    absent = [c for c in (cols.image, cols.id, cols.caption) if c and field_value(row, c) is _ABSENT]
    if cols.split and not file_split and field_value(row, cols.split) is _ABSENT:
        absent.append(cols.split)
    if absent:
        rid = field_value(row, cols.id or cols.image)
        rid = str(rid).strip() if isinstance(rid, str | int) else None
        detail = f"no field {', '.join(map(repr, absent))}"
        return Rejection(info.name, rid, src, Reason.MALFORMED_RECORD, detail, line, file_split)
    name = field_value(row, cols.image)
    rid = field_value(row, cols.id) if cols.id else name
    if not isinstance(name, str) or not isinstance(rid, str | int) or not str(rid).strip():
        return Rejection(info.name, None, src, Reason.MALFORMED_RECORD, f"no {cols.image!r} value", line)
    rid = str(rid).strip()
    split = file_split or _split_of(row, cols, info, rid)
    if split is None:
        detail = f"unknown split {field_value(row, cols.split)!r}"
        return Rejection(info.name, rid, src, Reason.MALFORMED_RECORD, detail, line)
    try:
        image, image_file = _locate(store, name.strip())
    except RecordRejected as e:
        return Rejection(info.name, rid, src, e.reason, e.detail, line, split)
    caption = field_value(row, cols.caption)
    others: list[str] = []
    if isinstance(caption, list):
        try:
            caption, others = _caption_list(caption)
        except RecordRejected as e:
            return Rejection(info.name, rid, src, e.reason, e.detail, line, split)
    # Bytes that are not UTF-8 stay in the string as surrogates (errors="surrogateescape"): the writer rejects them.
    if caption is not None and not isinstance(caption, str):
        return Rejection(info.name, rid, src, Reason.MALFORMED_RECORD, "caption is not text", line, split)
    modality = field_value(row, cols.modality) if cols.modality else None
    labels = field_value(row, cols.labels) if cols.labels else None
    meta = {
        "modality": (None if modality is _ABSENT else modality) or info.modality,
        "cuis": [],
        "labels": _labels(None if labels is _ABSENT else labels, separator),
        "licence": info.licence,
        "image_file": image_file,
    }
    if others:
        meta["captions"] = others
    return Record(info.name, rid, split, caption, image, src, meta, line)


def _split_of(row: dict[str, Any], cols: TableColumns, info: SourceInfo, rid: str) -> str | None:
    if not cols.split:
        return hashed_split(rid, info.seed, info.val_fraction, info.test_fraction)
    return SPLIT_NAMES.get(str(field_value(row, cols.split)).strip().lower())


def _caption_list(captions: list[Any]) -> tuple[str | None, list[str]]:
    """A list of captions: ``(first, the others)``, blanks, nulls and repeats dropped (a repeat would weigh a caption
    twice in the training stream's draw); ``(None, [])`` when none is left (rejected as an empty caption)."""
    kept: dict[str, None] = {}
    for item in captions:
        if item is None:  # a null in the list (MedICaT's s2orc_caption can be null) is a missing caption, not an error
            continue
        if not isinstance(item, str):
            raise RecordRejected(Reason.MALFORMED_RECORD, "caption list holds an item that is not text")
        text, reason = clean_caption(item)
        if reason == Reason.UNDECODABLE_TEXT:
            raise RecordRejected(reason, "a caption of the list is not valid UTF-8")
        if text is not None:
            kept[text] = None
    texts = list(kept)
    return (texts[0], texts[1:]) if texts else (None, [])


def _locate(store: ImageStore, name: str) -> tuple[Any, str]:
    """The image a record names and its file name; a name without image extension is tried with each usual one.

    Raises:
        RecordRejected: as ``store.locate``; ``missing_image`` naming the extensions tried; ``malformed_record`` when
            several files match (``x.png`` and ``x.jpg``: the record does not say which).
    """
    if Path(name).suffix.lower() in IMAGE_SUFFIXES:
        return store.locate(name), name
    try:
        located = store.locate(name)
        if not isinstance(store, FolderStore) or located.is_file():
            return located, name  # a file without extension: the writer reads its format from the bytes
    except RecordRejected as e:
        if e.reason != Reason.MISSING_IMAGE:
            raise
    found: dict[Any, tuple[Any, str]] = {}
    for suffix in TRIED_SUFFIXES:
        for candidate in (name + suffix, name + suffix.upper()):
            try:
                located = store.locate(candidate)
                # One entry per file: on a case-insensitive file system x.png and x.PNG are the same file.
                identity = _file_identity(located) if isinstance(store, FolderStore) else candidate
            except (RecordRejected, FileNotFoundError) as e:
                if isinstance(e, RecordRejected) and e.reason != Reason.MISSING_IMAGE:
                    raise
                continue
            found.setdefault(identity, (located, candidate))
    if len(found) == 1:
        return next(iter(found.values()))
    if found:
        names = ", ".join(sorted(c for _, c in found.values()))
        raise RecordRejected(Reason.MALFORMED_RECORD, f"image name {name!r} matches several files: {names}")
    root = getattr(store, "root", None) or getattr(store, "path", "")
    tried = "/".join(s.lstrip(".") for s in TRIED_SUFFIXES)
    raise RecordRejected(Reason.MISSING_IMAGE, f"{name} not found in {root} (also tried .{tried})")


def _file_identity(path: Path) -> tuple[int, int]:
    st = path.stat()  # FileNotFoundError when there is no such file
    if not stat.S_ISREG(st.st_mode):
        raise FileNotFoundError(path)
    return st.st_dev, st.st_ino


def _labels(value: Any, separator: str) -> list[str]:
    if value is None:
        return []
    items = value if isinstance(value, list) else str(value).split(separator)
    return [str(v).strip() for v in items if str(v).strip()]


def read_image_folder(
    root: Path,
    info: SourceInfo,
    templates: tuple[str, ...] = DEFAULT_TEMPLATES,
    class_names: dict[str, str] | None = None,
) -> Iterator[Record | Rejection]:
    """Yield one record per file under ``root/<class>/`` (or ``root/<split>/<class>/``), sorted by path.

    Args:
        root: the image folder.
        info: source name, modality, licence, split fractions and seed.
        templates: caption templates; ``{c}`` (or ``{label}``) is replaced by the class's display name. One is
            picked per image from a hash of its path and the seed, so captions do not depend on file order.
        class_names: display names by class folder; default: folder name with ``_``/``-`` read as spaces.
    """
    if not root.is_dir():
        raise PrepError(f"image folder {root} does not exist")
    return _folder_records(root, info, templates, class_names or {})


def _folder_records(root, info, templates, class_names) -> Iterator[Record | Rejection]:
    split_dirs = {SPLIT_NAMES[p.name.lower()]: p for p in _subdirs(root) if p.name.lower() in SPLIT_NAMES}
    if not split_dirs:
        yield from _read_classes(root, root, info, templates, class_names, None)
    for split in ("train", "val", "test"):
        if split in split_dirs:
            yield from _read_classes(split_dirs[split], root, info, templates, class_names, split)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_classes(folder, root, info, templates, class_names, split) -> Iterator[Record | Rejection]:
    loose = sorted(p for p in folder.iterdir() if p.is_file())
    for path in loose:  # files next to the class folders have no class: accounted for, not guessed
        rel = path.relative_to(root).as_posix()
        yield Rejection(info.name, rel, str(path), Reason.UNSUPPORTED_FILE, "not inside a class folder", None, split)
    for class_dir in _subdirs(folder):
        cls = class_dir.name
        display = class_names.get(cls, cls.replace("_", " ").replace("-", " "))
        for path in _walk_files(class_dir):
            rel = path.relative_to(root).as_posix()
            record_split = split or hashed_split(rel, info.seed, info.val_fraction, info.test_fraction)
            unusable = _unusable(path, root)
            if unusable is not None:
                yield Rejection(info.name, rel, str(path), *unusable, None, split)
                continue
            template = templates[int(short_hash(f"{info.seed}:{rel}"), 16) % len(templates)]
            caption = template.replace("{c}", display).replace("{label}", display)
            meta = {"modality": info.modality, "cuis": [], "labels": [f"{info.name}:{cls}"], "licence": info.licence}
            meta["class_name"] = display
            yield Record(info.name, rel, record_split, caption, path, str(path), meta)


def _walk_files(folder: Path) -> list[Path]:
    """All files below ``folder`` in sorted order, and the links to folders met on the way.

    Links to folders are not followed (one may lead out of the root, or back up into a loop) but are returned, so
    that each is accounted for as a rejection instead of vanishing from the counts.
    """
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):  # os.walk lists folder links in dirnames, never enters them
        dirnames.sort()
        links = [name for name in dirnames if os.path.islink(os.path.join(dirpath, name))]
        found.extend(Path(dirpath) / name for name in sorted(filenames + links))
    return found


def _unusable(path: Path, root: Path) -> tuple[str, str] | None:
    """``(reason, detail)`` when a file found under an image folder cannot become a sample, else ``None``."""
    real = escapes(path, root)  # a link (to a file or a folder, or inside a linked class folder) out of the root
    if real is not None:
        return Reason.PATH_ESCAPE, f"leads to {real} through a link, outside {root}"
    if path.is_dir():
        return Reason.UNSUPPORTED_FILE, "link to a folder, not followed"
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return Reason.UNSUPPORTED_FILE, "not an image suffix"
    try:
        mode = path.stat().st_mode
    except OSError:
        return None  # a broken link inside the root: reading it reports the missing image
    # A FIFO or device named *.jpg would block or stream forever when read.
    return None if stat.S_ISREG(mode) else (Reason.UNSUPPORTED_FILE, "not a regular file")
