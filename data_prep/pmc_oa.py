"""PMC-OA (Lin et al. 2023): sub-figures from PubMed Central with their sub-captions.

Release (Hugging Face ``axiong/pmc_oa``): JSONL rows with ``image`` (file name) and ``caption``, optionally ``pmcid``,
``url_name``, ``alignment_type``, ``alignment_score``; split files ``train.jsonl``, ``valid.jsonl``, ``test.jsonl``
or one ``pmc_oa.jsonl``; images in a folder or archive (``images/``, ``images.zip`` or the release's
``caption_T060_filtered_top4_sep_v0_subfigures/``). Without split files, records are split by a hash of ``pmcid``
(or of the image's ``PMCxxxx`` prefix) so sub-figures of one article stay together.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from data_prep.image_store import open_image_store
from data_prep.records import (
    PrepError,
    Reason,
    Record,
    RecordRejected,
    Rejection,
    hashed_split,
    read_jsonl_rows,
)

SOURCE = "pmc_oa"
SPLIT_FILES = {"train.jsonl": "train", "valid.jsonl": "val", "test.jsonl": "test"}
IMAGE_FOLDERS = ("images", "caption_T060_filtered_top4_sep_v0_subfigures", "images.zip", "images.tar")
EXTRAS = ("pmcid", "url_name", "alignment_type", "alignment_score")


def find_jsonl_files(root: Path) -> list[tuple[Path, str | None]]:
    """``[(jsonl, split or None)]``: the split files if present, else ``pmc_oa.jsonl`` or the only ``*.jsonl``."""
    if root.is_file():
        return [(root, SPLIT_FILES.get(root.name))]
    if not root.is_dir():
        raise PrepError(f"PMC-OA input {root} does not exist")
    split_files = [(root / name, split) for name, split in SPLIT_FILES.items() if (root / name).is_file()]
    if split_files:
        return split_files
    if (root / "pmc_oa.jsonl").is_file():
        return [(root / "pmc_oa.jsonl", None)]
    found = sorted(root.glob("*.jsonl"))
    if len(found) != 1:
        raise PrepError(
            f"no PMC-OA records file found in {root}: expected train.jsonl/valid.jsonl/test.jsonl or pmc_oa.jsonl"
        )
    return [(found[0], None)]


def find_images(root: Path) -> Path:
    """The image folder or archive next to the records (first of :data:`IMAGE_FOLDERS` that exists)."""
    base = root if root.is_dir() else root.parent
    return next((base / n for n in IMAGE_FOLDERS if (base / n).exists()), base / IMAGE_FOLDERS[0])


def read_records(
    root: Path,
    images: Path | None = None,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> Iterator[Record | Rejection]:
    """Yield one record per JSONL row.

    Args:
        root: the release folder or one JSONL file.
        images: the image folder, ``.zip`` or ``.tar``; found next to the records by default.
        val_fraction: share of articles put in ``val`` when there are no split files.
        test_fraction: share of articles put in ``test`` when there are no split files.
        seed: seed of the hashed split.
    """
    files = find_jsonl_files(root)  # checked now, before the output folder is touched
    store = open_image_store(images or find_images(root))
    return _records(files, store, (val_fraction, test_fraction, seed))


def _records(files: list[tuple[Path, str | None]], store, split_args: tuple) -> Iterator[Record | Rejection]:
    for path, split in files:
        for item in read_jsonl_rows(path, SOURCE):
            if isinstance(item, Rejection):
                yield item
                continue
            number, row = item
            yield _record(row, number, str(path), store, split, split_args)


def _record(row: dict, number: int, src: str, store, split: str | None, split_args) -> Record | Rejection:
    name = row.get("image")
    if not isinstance(name, str) or not name.strip():
        return Rejection(SOURCE, None, src, Reason.MALFORMED_RECORD, "no image field", number, split)
    pmcid = row.get("pmcid") if isinstance(row.get("pmcid"), str) else name.split("_", 1)[0]
    if split is None:
        val_fraction, test_fraction, seed = split_args
        split = hashed_split(pmcid, seed, val_fraction, test_fraction)
    try:
        image = store.locate(name)
    except RecordRejected as e:
        return Rejection(SOURCE, name, src, e.reason, e.detail, number, split)
    caption = row.get("caption")
    if caption is not None and not isinstance(caption, str):
        return Rejection(SOURCE, name, src, Reason.MALFORMED_RECORD, "caption is not text", number, split)
    meta = {"cuis": [], "labels": [], "image_file": name}
    meta.update({k: row[k] for k in EXTRAS if row.get(k) is not None})
    return Record(SOURCE, name, split, caption, image, src, meta, number)
