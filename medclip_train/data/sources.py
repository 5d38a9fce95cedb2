"""Shard sources: brace-expanded patterns with mixing weights, and their sample counts from ``sizes.json``.

Shards may be local paths, any fsspec URL (``https://``, ``s3://``...) or ``pipe:`` commands. ``sizes.json`` and
``manifest.json`` are read through fsspec from the folder of the shards (a URL's folder), or from the file a
source names in ``sizes``. Credentials come from the environment only (AWS_* for s3fs, ``FSSPEC_HTTPS`` as JSON
storage options for https headers); URLs are redacted in every message (:func:`redact`).
"""

from __future__ import annotations

import glob
import json
import os
import posixpath
import re
import shlex
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit, urlunsplit

from webdataset.shardlists import expand_urls


@dataclass
class ShardSource:
    """One data source of a run (e.g. ROCO, MedICaT, PMC-OA)."""

    shards: str
    """Brace pattern of shards (``train-{000000..000099}.tar``), a local glob (``train-*.tar``), or any URL
    webdataset or fsspec opens (``pipe:``, ``https://``, ``s3://``...)."""
    weight: float = 1.0
    """Mixing weight in resampled mode: the expected fraction of samples from this source is weight / sum."""
    name: str | None = None
    sizes: str | None = None
    """Path or URL of the ``sizes.json`` of these shards; default: the one next to them. Required for ``pipe:``
    patterns, whose folder cannot be told from the command."""

    def __post_init__(self):
        if self.weight <= 0:
            raise ValueError(f"data source {self.shards!r}: weight must be > 0, got {self.weight}")
        if self.name is None:
            self.name = redact(os.path.basename(os.path.dirname(self.shards)) or self.shards)

    def urls(self) -> list[str]:
        urls = expand_shard_pattern(self.shards)
        if not urls:
            raise ValueError(f"data source {self.name!r}: pattern {self.shards!r} matches no shard")
        return urls


def expand_shard_pattern(pattern: str) -> list[str]:
    """The shards a pattern names, in order; empty when a glob matches nothing.

    Braces (``train-{000000..000099}.tar``) and ``::`` lists are expanded as webdataset does; a local glob
    (``shards/mine/train-*.tar``) is matched and sorted, so a converter's shard count need not be known to use its
    shards; URLs and ``pipe:`` commands are kept as they are.
    """
    urls = []
    for url in expand_urls(pattern):
        urls += sorted(glob.glob(url)) if is_local(url) and glob.has_magic(url) else [url]
    return urls


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def is_fsspec_url(url: str) -> bool:
    """A URL webdataset would not open itself or would open with curl: read through fsspec instead."""
    return "://" in url and not url.startswith(("pipe:", "file://"))


_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://)[^/@\s'\"]+@")
_QUERY = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^\s?#'\"]*)[?#][^\s'\"]*")


def redact(text: str) -> str:
    """``text`` with the user:password of URLs and their query strings (presigned signatures, tokens) masked."""
    return _QUERY.sub(r"\1?***", _USERINFO.sub(r"\1***@", text))


def shard_name(url: str) -> str:
    """The name a shard has in ``sizes.json``: the file name of a path, of a URL's path, or of the ``.tar`` a
    ``pipe:`` command reads (``pipe:aws s3 cp s3://b/train-000001.tar -`` is ``train-000001.tar``)."""
    if url.startswith("pipe:"):
        tars = [t for t in shlex.split(url[5:]) if re.search(r"\.tar(\.\w+)?$", urlsplit(t).path)]
        return posixpath.basename(urlsplit(tars[-1]).path) if tars else url
    if "://" in url:
        return posixpath.basename(urlsplit(url).path)
    return os.path.basename(url)


def sibling(url: str, name: str) -> str | None:
    """The file ``name`` in the folder of shard ``url`` (a URL without its query), or None for ``pipe:``."""
    if url.startswith("pipe:"):
        return None
    if "://" in url:
        parts = urlsplit(url)
        return urlunsplit((parts.scheme, parts.netloc, posixpath.join(posixpath.dirname(parts.path), name), "", ""))
    return os.path.join(os.path.dirname(url), name)


def _read_json(path: str):
    if "://" not in path:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    import fsspec

    with fsspec.open(path, "r", encoding="utf-8") as f:
        return json.load(f)


def check_local_shards_exist(urls: list[str], field: str) -> None:
    missing = [u for u in urls if is_local(u) and not os.path.exists(u)]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise FileNotFoundError(f"{field}: missing shard(s) {', '.join(missing[:3])}{more}")


@lru_cache(maxsize=64)
def _read_sizes(path: str) -> dict[str, int]:
    return {k: int(v) for k, v in _read_json(path).items()}


def shard_sizes(urls: list[str], field: str, sizes_file: str | None = None) -> list[int]:
    """Sample count of every shard, from ``sizes_file`` or the ``sizes.json`` next to it (the file open_clip
    reads), local or through fsspec."""
    sizes = []
    for url in urls:
        sizes_path = sizes_file or sibling(url, "sizes.json")
        hint = (
            "write it with medclip-prep (any converter writes it), name it in the source's `sizes` field, or use "
            "data.epoch_mode=resampled with samples_per_epoch"
        )
        if sizes_path is None:
            raise FileNotFoundError(
                f"{field}: exact epochs need sample counts; a pipe: pattern has no folder to find sizes.json in, "
                f"so give it in the source's `sizes` field (path or URL of a sizes.json), or {hint}"
            )
        try:
            table = _read_sizes(sizes_path)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"{field}: exact epochs need sample counts, but {redact(sizes_path)} does not exist; {hint}"
            ) from None
        name = shard_name(url)
        if name not in table:
            raise ValueError(f"{field}: shard {name} is not listed in {redact(sizes_path)}")
        sizes.append(table[name])
    return sizes


def read_label_counts(urls: list[str], split: str = "train") -> dict[str, int]:
    """Label/CUI frequencies from the ``manifest.json`` of each shard folder (written by medclip-prep)."""
    counts: dict[str, int] = {}
    for path in sorted({p for p in (sibling(u, "manifest.json") for u in urls) if p is not None}):
        try:
            manifest = _read_json(path)
        except FileNotFoundError:
            continue
        per_split = manifest.get("label_counts", {})
        for label, n in per_split.get(split, {}).items():
            counts[label] = counts.get(label, 0) + int(n)
    return counts
