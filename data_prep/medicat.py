"""MedICaT (allenai/medicat): medical figures with captions and inline references, without ROCO's figures.

Release: ``s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl`` with one JSON object per line
(``pdf_hash, fig_key, fig_uri, s2_caption, s2orc_caption, s2orc_references, radiology, scope, predicted_type,
oa_info``; any of them may be null) and the figure at ``figures/{pdf_hash}_{fig_uri}``.

The caption is ``s2_caption``, written exactly as released (only surrounding whitespace stripped); when it is null or
empty ``s2orc_caption`` is used and the ``.json`` says so in ``caption_field``. MedICaT has no official split: records
are split by a hash of ``pdf_hash`` so all figures of one paper land in the same split.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_prep.records import (
    PrepError,
    Reason,
    Record,
    RecordRejected,
    Rejection,
    hashed_split,
    read_jsonl_rows,
    safe_join,
)

SOURCE = "medicat"
JSONL_NAME = "s2_full_figures_oa_nonroco_combined_medical_top4_public.jsonl"
CAPTION_FIELDS = ("s2_caption", "s2orc_caption")


def find_jsonl(root: Path) -> Path:
    """The release's jsonl: ``root`` itself, the official name in ``root``, or the only ``*.jsonl`` there."""
    if root.is_file():
        return root
    if not root.is_dir():
        raise PrepError(f"MedICaT input {root} does not exist")
    if (root / JSONL_NAME).is_file():
        return root / JSONL_NAME
    found = sorted(root.glob("*.jsonl"))
    if len(found) != 1:
        raise PrepError(f"no MedICaT records file found: expected {root / JSONL_NAME}")
    return found[0]


def read_records(
    root: Path,
    figures: Path | None = None,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> Iterator[Record | Rejection]:
    """Yield one record per jsonl line.

    Args:
        root: the release folder (or the jsonl file itself).
        figures: the figures folder; defaults to ``figures/`` next to the jsonl.
        val_fraction: share of papers (by ``pdf_hash``) put in ``val``.
        test_fraction: share of papers put in ``test``.
        seed: seed of the hashed split.
    """
    jsonl = find_jsonl(root)  # checked now, before the output folder is touched
    return _records(jsonl, figures or jsonl.parent / "figures", (val_fraction, test_fraction, seed))


def _records(jsonl: Path, figures: Path, split_args: tuple) -> Iterator[Record | Rejection]:
    for item in read_jsonl_rows(jsonl, SOURCE):
        yield item if isinstance(item, Rejection) else _record(*item, str(jsonl), figures, split_args)


def _record(number: int, row: dict, src: str, figures: Path, split_args: tuple) -> Record | Rejection:
    if not isinstance(row.get("pdf_hash"), str) or not isinstance(row.get("fig_uri"), str):
        return Rejection(SOURCE, None, src, Reason.MALFORMED_RECORD, "pdf_hash/fig_uri missing", number)
    rid = f"{row['pdf_hash']}_{row['fig_uri']}"
    val_fraction, test_fraction, seed = split_args
    split = hashed_split(row["pdf_hash"], seed, val_fraction, test_fraction)
    try:
        image = safe_join(figures, rid)
    except RecordRejected as e:
        return Rejection(SOURCE, rid, src, e.reason, e.detail, number, split)
    field = next((k for k in CAPTION_FIELDS if isinstance(row.get(k), str) and row[k].strip()), CAPTION_FIELDS[0])
    caption = row.get(field)
    if caption is not None and not isinstance(caption, str):
        return Rejection(SOURCE, rid, src, Reason.MALFORMED_RECORD, f"{field} is not text", number, split)
    return Record(SOURCE, rid, split, caption, image, src, _meta(row, field), number)


def _meta(row: dict[str, Any], caption_field: str) -> dict[str, Any]:
    oa_info = row.get("oa_info") if isinstance(row.get("oa_info"), dict) else {}
    oa = oa_info.get("oa") if isinstance(oa_info.get("oa"), dict) else {}
    radiology = row.get("radiology")
    return {
        "modality": None if radiology is None else ("radiology" if radiology else "non-radiology"),
        "cuis": [],
        "labels": [],
        "licence": oa.get("license"),
        "caption_field": caption_field,
        "pdf_hash": row["pdf_hash"],
        "fig_key": row.get("fig_key"),
        "fig_uri": row["fig_uri"],
        "radiology": radiology,
        "scope": row.get("scope"),
        "predicted_type": row.get("predicted_type"),
        "s2orc_references": row.get("s2orc_references"),
        "doi": oa_info.get("doi"),
        "oa_status": oa.get("oa_status"),
    }
