"""``medclip-prep inspect OUT``: what a converted folder holds, read back from the shards themselves.

Reports sample counts per split, caption length percentiles (whitespace tokens, or a Hugging Face tokenizer's; with
``--context-length`` also the share of captions longer than the model's text context, which it silently truncates),
an image size histogram, rejections per reason, and problems: leftover ``*.tar.tmp``, a missing ``sizes.json`` or
``manifest.json`` (an interrupted conversion), shard counts that disagree with ``sizes.json``, samples without an
image or caption, repeated keys.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_prep.records import PrepError
from data_prep.writer import split_sort_key

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SIDE_BINS = (64, 128, 256, 512, 1024, 2048)


def _side_bin(side: int) -> str:
    lower = 0
    for edge in SIDE_BINS:
        if side <= edge:
            return f"{lower + 1}-{edge}" if lower else f"<={edge}"
        lower = edge
    return f">{SIDE_BINS[-1]}"


# webdataset's base_plus_ext: the key is the member name up to the first dot of its base name, folders included.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def _read_shard(path: Path, max_samples: int | None) -> list[dict[str, Any]]:
    """Samples of one shard as ``{key, exts, caption, image_size}``, grouped as webdataset and open_clip group them.

    A sample is a run of consecutive members with the same key; a member with another key, or with an extension the
    sample already has, starts the next sample. So a key that comes back later in a shard is a second sample with the
    same key (what a training run reads), not merged into the first: :func:`inspect_output` reports it. Members
    without an extension are skipped, as readers skip them. Stops after ``max_samples`` samples.
    """
    samples: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    with tarfile.open(path, "r") as tar:
        for member in tar:
            match = _KEY_EXT.match(member.name) if member.isfile() else None
            if match is None:
                continue
            key, ext = match.group(1), match.group(2).lower()
            if current is None or key != current["key"] or ext in current["exts"]:
                if max_samples and len(samples) >= max_samples:
                    break
                current = {"key": key, "exts": [], "caption": None, "image_size": None}
                samples.append(current)
            current["exts"].append(ext)
            data = tar.extractfile(member).read()
            if ext == "txt":
                current["caption"] = data.decode("utf-8", "replace")
            elif ext in IMAGE_EXTS:
                try:
                    current["image_size"] = Image.open(io.BytesIO(data)).size  # header only
                except Exception:  # a broken image is reported as a problem, not raised
                    current["image_size"] = None
    return samples


def _token_counter(tokenizer: str | None):
    """``(count, special)``: token counts of texts without special tokens, and how many the tokenizer adds."""
    if tokenizer is None:
        return (lambda texts: [len(t.split()) for t in texts]), 0
    from transformers import AutoTokenizer  # slow import, only when asked for

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    except (OSError, ValueError) as e:
        raise PrepError(f"--tokenizer {tokenizer}: cannot be loaded ({e})") from None

    def count(texts):
        return [len(ids) for ids in tok(list(texts), add_special_tokens=False)["input_ids"]] if texts else []

    return count, tok.num_special_tokens_to_add(pair=False)


def _percentiles(lengths: list[int], context: int | None = None, special: int = 0) -> dict[str, float]:
    """Length percentiles; with ``context``, how many captions (special tokens added, as the model's tokenizer
    does) do not fit into it."""
    if not lengths:
        return {}
    values = np.asarray(lengths)
    stats = {f"p{q}": float(np.percentile(values, q)) for q in (5, 25, 50, 75, 90, 95, 99)}
    stats = {**stats, "mean": round(float(values.mean()), 2), "max": int(values.max())}
    if context is not None:
        over = int((values + special > context).sum())
        stats.update(context_length=context, truncated=over, truncated_fraction=over / len(values))
    return stats


def _load_json(path: Path, problems: list[str], missing: str) -> Any:
    if not path.is_file():
        problems.append(missing)
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        problems.append(f"{path.name} unreadable: {e}")
        return None


def inspect_output(
    output: Path, tokenizer: str | None = None, max_samples: int | None = None, context_length: int | None = None
) -> dict[str, Any]:
    """Read a converted folder back and describe it (see the module docstring).

    Args:
        output: the converter's output folder.
        tokenizer: Hugging Face tokenizer name or path for caption lengths; whitespace tokens when ``None``.
        max_samples: read at most this many samples per shard (for a quick look at large folders).
        context_length: the model's text context in tokens, special tokens included (``model.context_length``):
            counts the captions longer than that per split.
    """
    if not output.is_dir():
        raise PrepError(f"output folder {output} does not exist")
    problems = [f"leftover partial shard {p.name} (interrupted run)" for p in sorted(output.glob("*.tar.tmp"))]
    sizes = _load_json(output / "sizes.json", problems, "no sizes.json: the conversion did not finish")
    manifest = _load_json(output / "manifest.json", problems, "no manifest.json: the conversion did not finish")
    count_tokens, special = _token_counter(tokenizer)
    splits: dict[str, Counter] = defaultdict(Counter)
    captions: dict[str, list[str]] = defaultdict(list)
    sides, formats = Counter(), Counter()
    keys: dict[str, list[str]] = defaultdict(list)  # key -> the shard of each sample with that key
    for shard in sorted(output.glob("*.tar")):
        split = shard.name.rsplit("-", 1)[0]
        samples = _read_shard(shard, max_samples)
        splits[split]["shards"] += 1
        splits[split]["samples"] += len(samples)
        problems += _shard_problems(shard, samples, sizes, max_samples)
        for s in samples:
            keys[s["key"]].append(shard.name)
            formats.update(e for e in s["exts"] if e in IMAGE_EXTS)
            if s["caption"] is not None:
                captions[split].append(s["caption"])
            if s["image_size"]:
                sides[_side_bin(max(s["image_size"]))] += 1
    # Our writer keeps keys unique across all shards; a shard from elsewhere may not, and readers then yield
    # separate samples sharing one key (a sample duplicated, or split into an image-only and a caption-only one).
    repeated = {k: len(shards) for k, shards in keys.items() if len(shards) > 1}
    problems += [f"key {k!r} appears {n} times ({', '.join(sorted(set(keys[k])))})" for k, n in repeated.items()][:10]
    if len(repeated) > 10:
        problems.append(f"... {len(repeated) - 10} more keys appear more than once")
    order = [*(f"<={SIDE_BINS[0]}",), *(f"{a + 1}-{b}" for a, b in zip(SIDE_BINS, SIDE_BINS[1:])), f">{SIDE_BINS[-1]}"]
    return {
        "output": str(output),
        "complete": not problems,
        "problems": problems,
        "splits": {k: dict(splits[k]) for k in sorted(splits, key=split_sort_key)},
        "caption_tokens": {
            "tokenizer": tokenizer or "whitespace",
            **{
                split: _percentiles(count_tokens(captions[split]), context_length, special)
                for split in sorted(captions, key=split_sort_key)
            },
        },
        "image_sides": {b: sides[b] for b in order if sides[b]},
        "image_formats": dict(formats),
        "rejected": (manifest or {}).get("rejected", _count_rejections(output / "rejected.jsonl")),
        "counts": (manifest or {}).get("counts"),
        "repeated_keys": repeated,
    }


def _shard_problems(shard: Path, samples: list[dict], sizes: dict | None, max_samples: int | None) -> list[str]:
    problems = []
    for s in samples:
        if not any(e in IMAGE_EXTS for e in s["exts"]):
            problems.append(f"{shard.name}: sample {s['key']} has no image")
        elif s["image_size"] is None:
            problems.append(f"{shard.name}: sample {s['key']} has an unreadable image")
        if "txt" not in s["exts"]:
            problems.append(f"{shard.name}: sample {s['key']} has no caption")
    if sizes is not None and shard.name not in sizes:
        problems.append(f"{shard.name} is not listed in sizes.json")
    elif sizes is not None and not max_samples and sizes[shard.name] != len(samples):
        problems.append(f"{shard.name}: sizes.json says {sizes[shard.name]} samples, the shard holds {len(samples)}")
    return problems


def _count_rejections(path: Path) -> dict[str, int]:
    if not path.is_file():
        return {}
    reasons = Counter()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            reasons[json.loads(line).get("reason", "?")] += 1
        except ValueError:
            reasons["<unreadable line>"] += 1
    return dict(sorted(reasons.items()))


def format_report(report: dict[str, Any]) -> str:
    """Plain-text rendering of :func:`inspect_output`'s report."""
    lines = [f"{report['output']}: {'complete' if report['complete'] else 'INCOMPLETE'}"]
    if report.get("counts"):
        c = report["counts"]
        lines.append(f"manifest: read={c['read']} written={c['written']} rejected={c['rejected']}")
    for split, info in report["splits"].items():
        lines.append(f"  {split}: {info['samples']} samples in {info['shards']} shard(s)")
    tokens = report["caption_tokens"]
    lines.append(f"caption length ({tokens['tokenizer']} tokens):")
    for split, stats in tokens.items():
        if split != "tokenizer" and stats:
            line = "  ".join(f"p{q}={stats[f'p{q}']:g}" for q in (50, 90, 95, 99))
            line = f"  {split}: {line}  max={stats['max']}  mean={stats['mean']:g}"
            if "truncated" in stats:
                share = f"{stats['truncated_fraction']:.1%}"
                line += f"  longer than context {stats['context_length']}: {share} ({stats['truncated']})"
            lines.append(line)
    lines.append("image longest side: " + (", ".join(f"{k}: {v}" for k, v in report["image_sides"].items()) or "-"))
    lines.append("image formats: " + (", ".join(f"{k}: {v}" for k, v in report["image_formats"].items()) or "-"))
    lines.append("rejected: " + (", ".join(f"{k}: {v}" for k, v in report["rejected"].items()) or "none"))
    lines += [f"problem: {p}" for p in report["problems"]]
    return "\n".join(lines)
