"""Shard sources: brace-expanded patterns with mixing weights, and their sample counts from ``sizes.json``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache

from webdataset.shardlists import expand_urls


@dataclass
class ShardSource:
    """One data source of a run (e.g. ROCO, MedICaT, PMC-OA)."""

    shards: str
    """Brace pattern of shards, local path or any URL webdataset opens (``pipe:``, ``s3://`` via fsspec...)."""
    weight: float = 1.0
    """Mixing weight in resampled mode: the expected fraction of samples from this source is weight / sum."""
    name: str | None = None

    def __post_init__(self):
        if self.weight <= 0:
            raise ValueError(f"data source {self.shards!r}: weight must be > 0, got {self.weight}")
        if self.name is None:
            self.name = os.path.basename(os.path.dirname(self.shards)) or self.shards

    def urls(self) -> list[str]:
        urls = expand_urls(self.shards)
        if not urls:
            raise ValueError(f"data source {self.name!r}: pattern {self.shards!r} matches no shard")
        return urls


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def check_local_shards_exist(urls: list[str], field: str) -> None:
    missing = [u for u in urls if is_local(u) and not os.path.exists(u)]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise FileNotFoundError(f"{field}: missing shard(s) {', '.join(missing[:3])}{more}")


@lru_cache(maxsize=64)
def _read_sizes(path: str) -> dict[str, int]:
    with open(path, encoding="utf-8") as f:
        return {k: int(v) for k, v in json.load(f).items()}


def shard_sizes(urls: list[str], field: str) -> list[int]:
    """Sample count of every shard, from the ``sizes.json`` next to it (the file open_clip reads)."""
    sizes = []
    for url in urls:
        folder = os.path.dirname(url)
        sizes_path = os.path.join(folder, "sizes.json")
        if not is_local(url) or not os.path.exists(sizes_path):
            raise FileNotFoundError(
                f"{field}: exact epochs need sample counts, but {sizes_path} does not exist; write it with "
                "medclip-prep (any converter writes it) or use data.epoch_mode=resampled with samples_per_epoch"
            )
        table = _read_sizes(sizes_path)
        name = os.path.basename(url)
        if name not in table:
            raise ValueError(f"{field}: shard {name} is not listed in {sizes_path}")
        sizes.append(table[name])
    return sizes


def read_label_counts(urls: list[str], split: str = "train") -> dict[str, int]:
    """Label/CUI frequencies from the ``manifest.json`` of each shard folder (written by medclip-prep)."""
    counts: dict[str, int] = {}
    for folder in sorted({os.path.dirname(u) for u in urls if is_local(u)}):
        path = os.path.join(folder, "manifest.json")
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        per_split = manifest.get("label_counts", {})
        for label, n in per_split.get(split, {}).items():
            counts[label] = counts.get(label, 0) + int(n)
    return counts
