"""Reading converter output back the way a consumer would, and the accounting every conversion must satisfy."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def read_samples(output: Path) -> list[dict]:
    """All samples of all shards, with the ``tarfile`` module: ``{key, shard, image_ext, image, txt, json}``."""
    samples = []
    for shard in sorted(output.glob("*.tar")):
        by_key: dict[str, dict] = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                sample = by_key.setdefault(key, {"key": key, "shard": shard.name})
                if ext in IMAGE_EXTS:
                    sample["image_ext"], sample["image"] = ext, data
                else:
                    sample[ext] = data
        for sample in by_key.values():
            sample["txt"] = sample["txt"].decode("utf-8")
            sample["json"] = json.loads(sample["json"])
            samples.append(sample)
    return samples


def summary_counts(stdout: str) -> dict[str, int]:
    """``written=N rejected=M read=R`` from a converter's stdout."""
    match = re.search(r"written=(\d+) rejected=(\d+) read=(\d+)", stdout)
    assert match, f"no summary line in {stdout!r}"
    return dict(zip(("written", "rejected", "read"), map(int, match.groups()), strict=True))


def rejections(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "rejected.jsonl").read_text(encoding="utf-8").splitlines()]


def check_accounting(output: Path, stdout: str | None = None) -> tuple[dict, list[dict], list[dict]]:
    """Assert written + rejected == read from the summary line, the manifest, the shards and rejected.jsonl.

    Returns:
        ``(manifest, samples, rejections)``.
    """
    manifest = json.loads((output / "manifest.json").read_text(encoding="utf-8"))
    sizes = json.loads((output / "sizes.json").read_text(encoding="utf-8"))
    samples, rejected = read_samples(output), rejections(output)
    counts = manifest["counts"]
    assert counts["written"] + counts["rejected"] == counts["read"]
    assert len(samples) == counts["written"] == sum(sizes.values())
    assert len(rejected) == counts["rejected"] == sum(manifest["rejected"].values())
    if stdout is not None:
        assert summary_counts(stdout) == counts
    assert sorted(sizes) == sorted(p.name for p in output.glob("*.tar"))
    assert not list(output.glob("*.tmp")), "temporary files left behind"
    keys = [s["key"] for s in samples]
    assert len(keys) == len(set(keys)), "sample keys are not unique"
    assert all("." not in k and "/" not in k for k in keys)
    return manifest, samples, rejected


def reasons_by_id(rejected: list[dict]) -> dict[str, str]:
    return {r["id"]: r["reason"] for r in rejected}
