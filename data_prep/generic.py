"""Generic sources for researchers bringing a new modality: a CSV or JSONL table, or an image folder by class.

- table (CSV/JSONL): one row per image, with an image path column and a caption column (names given by flags);
  optional id, split, labels and modality columns. Image paths are relative to ``--images`` (a folder, ``.zip`` or
  ``.tar``; default: the table's folder); absolute paths and ``..`` are refused.
- image folder: ``root/<class>/*`` (or ``root/{train,val,test}/<class>/*``); captions from templates with ``{c}``
  (CLIP_benchmark's placeholder; ``{label}`` also works) replaced by the class's display name; labels
  ``["<source>:<class>"]``.
"""

from __future__ import annotations

import csv
import os
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
    hashed_split,
    read_jsonl_rows,
    short_hash,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
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
) -> Iterator[Record | Rejection]:
    """Records of a CSV table, one per row; the file and its header are checked now."""
    if not path.is_file():
        raise PrepError(f"CSV file {path} does not exist")
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        _check_columns(path, next(csv.reader(f, delimiter=delimiter), []), columns)
    store = open_image_store(images or path.parent)
    return _csv_records(path, columns, info, store, delimiter, label_separator)


def _csv_records(path, columns, info, store, delimiter, label_separator) -> Iterator[Record | Rejection]:
    # surrogateescape keeps reading past bytes that are not UTF-8; only the affected row is rejected.
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for row in reader:
            if None in row.values():
                yield Rejection(info.name, None, str(path), Reason.MALFORMED_RECORD, "short row", reader.line_num)
                continue
            yield _table_record(row, reader.line_num, str(path), columns, info, store, label_separator)


def read_jsonl(
    path: Path, columns: TableColumns, info: SourceInfo, images: Path | None = None, label_separator: str = ";"
) -> Iterator[Record | Rejection]:
    """Records of a JSONL table, one per line; the file and the fields of its first record are checked now."""
    if not path.is_file():
        raise PrepError(f"JSONL file {path} does not exist")
    first = next((item for item in read_jsonl_rows(path, info.name) if not isinstance(item, Rejection)), None)
    if first is not None:  # only image and caption: other fields may be missing from some rows
        _check_columns(path, list(first[1]), TableColumns(columns.image, columns.caption))
    return _jsonl_records(path, columns, info, open_image_store(images or path.parent), label_separator)


def _jsonl_records(path, columns, info, store, label_separator) -> Iterator[Record | Rejection]:
    for item in read_jsonl_rows(path, info.name):
        if isinstance(item, Rejection):
            yield item
            continue
        number, row = item
        yield _table_record(row, number, str(path), columns, info, store, label_separator)


def _check_columns(path: Path, fieldnames: list[str], columns: TableColumns) -> None:
    wanted = [c for c in (columns.image, columns.caption, columns.id, columns.split, columns.labels) if c]
    missing = [c for c in wanted if c not in fieldnames]
    if missing:
        raise PrepError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(fieldnames)})")


def _table_record(
    row: dict[str, Any], line: int, src: str, cols: TableColumns, info: SourceInfo, store: ImageStore, separator: str
) -> Record | Rejection:
    name = row.get(cols.image)
    rid = row.get(cols.id) if cols.id else name
    if not isinstance(name, str) or not isinstance(rid, str | int) or not str(rid).strip():
        return Rejection(info.name, None, src, Reason.MALFORMED_RECORD, f"no {cols.image!r} value", line)
    rid = str(rid).strip()
    split = _split_of(row, cols, info, rid)
    if split is None:
        detail = f"unknown split {row.get(cols.split)!r}"
        return Rejection(info.name, rid, src, Reason.MALFORMED_RECORD, detail, line)
    try:
        image = store.locate(name.strip())
    except RecordRejected as e:
        return Rejection(info.name, rid, src, e.reason, e.detail, line, split)
    caption = row.get(cols.caption)
    # Bytes that are not UTF-8 stay in the string as surrogates (errors="surrogateescape"): the writer rejects them.
    if caption is not None and not isinstance(caption, str):
        return Rejection(info.name, rid, src, Reason.MALFORMED_RECORD, "caption is not text", line, split)
    meta = {
        "modality": (row.get(cols.modality) if cols.modality else None) or info.modality,
        "cuis": [],
        "labels": _labels(row.get(cols.labels) if cols.labels else None, separator),
        "licence": info.licence,
        "image_file": name.strip(),
    }
    return Record(info.name, rid, split, caption, image, src, meta, line)


def _split_of(row: dict[str, Any], cols: TableColumns, info: SourceInfo, rid: str) -> str | None:
    if not cols.split:
        return hashed_split(rid, info.seed, info.val_fraction, info.test_fraction)
    return SPLIT_NAMES.get(str(row.get(cols.split, "")).strip().lower())


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
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                yield Rejection(info.name, rel, str(path), Reason.UNSUPPORTED_FILE, "not an image suffix", None, split)
                continue
            template = templates[int(short_hash(f"{info.seed}:{rel}"), 16) % len(templates)]
            caption = template.replace("{c}", display).replace("{label}", display)
            meta = {"modality": info.modality, "cuis": [], "labels": [f"{info.name}:{cls}"], "licence": info.licence}
            meta["class_name"] = display
            yield Record(info.name, rel, record_split, caption, path, str(path), meta)


def _walk_files(folder: Path) -> list[Path]:
    """All files below ``folder`` in sorted order, without following directory symlinks."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        found.extend(Path(dirpath) / name for name in sorted(filenames))
    return found
