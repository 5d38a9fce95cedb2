"""ROCOv2 (ImageCLEFmedical caption 2023/2024 data).

Release layout (Zenodo / ``source_dataset/`` of the GitHub mirror)::

    {train,valid,test}_captions.csv          ID,Caption             (quoted CSV: captions contain commas)
    {split}_concepts.csv                     ID,CUIs                (';'-separated, may be empty)
    {split}_concepts_manual.csv              ID,CUIs                (manually curated subset)
    cui_mapping.csv                          CUI,Canonical name
    {train,valid,test}/<ID>.jpg              images
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from data_prep.records import PrepError, Reason, Record, RecordRejected, Rejection, safe_join

SOURCE = "rocov2"
SPLITS = {"train": "train", "valid": "val", "test": "test"}


def read_records(root: Path, images_root: Path | None = None) -> Iterator[Record | Rejection]:
    """Yield one record per caption row, splits in train, valid, test order.

    Args:
        root: folder holding the CSV files.
        images_root: folder holding ``{train,valid,test}/`` image folders; defaults to ``root``.
    """
    if not root.is_dir():
        raise PrepError(f"ROCOv2 input folder {root} does not exist")
    found = [(s, root / f"{s}_captions.csv") for s in SPLITS if (root / f"{s}_captions.csv").is_file()]
    if not found:
        raise PrepError(
            f"no ROCOv2 captions file found in {root}: expected train_captions.csv, valid_captions.csv "
            "or test_captions.csv"
        )
    for _, captions_file in found:
        _open_csv(captions_file, {"ID", "Caption"})[1].close()  # header checked before the output is touched
    return _records(root, images_root or root, found)


def _records(root: Path, images_root: Path, found: list[tuple[str, Path]]) -> Iterator[Record | Rejection]:
    names = _read_cui_names(root / "cui_mapping.csv")
    for split_dir, captions_file in found:
        concepts = _read_concepts(root / f"{split_dir}_concepts.csv")
        manual = _read_concepts(root / f"{split_dir}_concepts_manual.csv")
        images = images_root / split_dir
        yield from _read_captions(captions_file, SPLITS[split_dir], images, concepts, manual, names)


def _open_csv(path: Path, required: set[str]) -> tuple[csv.DictReader, object]:
    # surrogateescape keeps reading past bytes that are not UTF-8; the affected row is rejected, not the file.
    f = open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.DictReader(f)
    missing = required - set(reader.fieldnames or [])
    if missing:
        f.close()
        raise PrepError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    return reader, f


def _read_captions(path, split, images, concepts, manual, names) -> Iterator[Record | Rejection]:
    reader, f = _open_csv(path, {"ID", "Caption"})
    with f:
        for row in reader:
            rid, caption = row["ID"], row["Caption"]
            if rid is None or not rid.strip():
                yield Rejection(SOURCE, rid, str(path), Reason.MALFORMED_RECORD, "no ID", reader.line_num, split)
                continue
            rid = rid.strip()
            try:
                image = safe_join(images, f"{rid}.jpg")
            except RecordRejected as e:
                yield Rejection(SOURCE, rid, str(path), e.reason, e.detail, reader.line_num, split)
                continue
            cuis = concepts.get(rid, [])
            meta = {
                "modality": "radiology",
                "cuis": cuis,
                "labels": [],
                "cuis_manual": manual.get(rid, []),
                "cui_names": {c: names[c] for c in dict.fromkeys(cuis + manual.get(rid, [])) if c in names},
            }
            yield Record(SOURCE, rid, split, caption, image, str(path), meta, reader.line_num)


def _read_concepts(path: Path) -> dict[str, list[str]]:
    """``ID,CUIs`` with ``C0040405;C0856747`` (or empty) -> ``{ID: [CUI, ...]}``; a missing file is no concepts."""
    if not path.is_file():
        return {}
    reader, f = _open_csv(path, {"ID", "CUIs"})
    with f:
        return {r["ID"].strip(): [c.strip() for c in (r["CUIs"] or "").split(";") if c.strip()] for r in reader}


def _read_cui_names(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    reader, f = _open_csv(path, {"CUI", "Canonical name"})
    with f:
        return {r["CUI"].strip(): (r["Canonical name"] or "").strip() for r in reader if r["CUI"]}
