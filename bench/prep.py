"""Conversion throughput of ``medclip-prep``: images per second at 1 and 2 worker processes.

``python -m bench prep [--images 400] [--workers 1 2] [--max-image-side 512]`` writes synthetic 1024x768 JPEGs
(smooth structure plus noise, about the size of a journal figure) as an image folder, converts it with the
``imagefolder`` converter (decode, resize to 512, re-encode, tar) once per worker count, writes
``bench/results/prep.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.generic import SourceInfo, read_image_folder
from data_prep.writer import WriteOptions, write_dataset

RESULTS = Path(__file__).resolve().parent / "results" / "prep.json"


def make_images(root: Path, count: int, size: tuple[int, int], seed: int = 0) -> int:
    """Write ``count`` JPEGs into ``root/<class>/``; returns the total bytes written."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.ogrid[0:h, 0:w]
    # Sensor-like noise from a few precomputed fields, rolled per image: drawing fresh noise dominated the run time.
    noise = [rng.normal(0, 8, (h, w, 3)).astype(np.float32) for _ in range(4)]
    total = 0
    for i in range(count):
        cls = root / f"class{i % 4}"
        cls.mkdir(parents=True, exist_ok=True)
        # Low-frequency structure (a blob and a gradient) plus noise: compresses like a real figure.
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(80, 300)
        base = 90 + 80 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)) + 40 * (xx / w)
        tint = rng.uniform(0.7, 1.1, 3).astype(np.float32)
        field = np.roll(noise[i % 4], (int(rng.integers(h)), int(rng.integers(w))), axis=(0, 1))
        pixels = np.clip(base[..., None].astype(np.float32) * tint + field, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        (cls / f"img{i:05d}.jpg").write_bytes(buf.getvalue())
        total += buf.tell()
    return total


def convert(images: Path, output: Path, workers: int, max_side: int) -> tuple[float, int]:
    """One conversion; returns (seconds, samples written)."""
    options = WriteOptions(max_image_side=max_side, workers=workers, overwrite=True, quiet=True)
    start = time.perf_counter()
    summary = write_dataset(read_image_folder(images, SourceInfo("bench")), output, options, "imagefolder")
    return time.perf_counter() - start, summary.written


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_avg_1m_before": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def table(result: dict) -> str:
    rows = ["| workers | images | seconds | images/s | speed-up |", "|---|---|---|---|---|"]
    base = result["runs"][0]["images_per_s"]
    for run in result["runs"]:
        speedup = run["images_per_s"] / base
        rows.append(f"| {run['workers']} | {run['images']} | {run['seconds']:.2f} | {run['images_per_s']:.1f} | "
                    f"{speedup:.2f}x |")  # fmt: skip
    return "\n".join(rows)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench prep", description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400, help="number of synthetic JPEGs (default 400)")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--max-image-side", type=int, default=512)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time (default 1 2)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per worker count; the fastest is kept")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench_prep_"))
    try:
        info = machine()
        made = time.perf_counter()
        size_bytes = make_images(work / "images", args.images, (args.width, args.height))
        made = time.perf_counter() - made
        # Worker counts take turns, best of the repeats kept: on a shared machine, load changes during a run.
        times: dict[int, list[tuple[float, int]]] = {w: [] for w in args.workers}
        for _ in range(args.repeats):
            for workers in args.workers:
                times[workers].append(convert(work / "images", work / "out", workers, args.max_image_side))
        runs = []
        for workers, measured in times.items():
            seconds, written = min(measured)
            assert written == args.images, f"{written} of {args.images} images written"
            runs.append({"workers": workers, "images": written, "seconds": round(seconds, 3),
                         "images_per_s": round(written / seconds, 1),
                         "all_seconds": [round(t, 3) for t, _ in measured]})  # fmt: skip
        info["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "prep",
        "command": "python -m bench prep " + " ".join(argv),
        "machine": info,
        "input": {
            "images": args.images,
            "size": [args.width, args.height],
            "mean_kb": round(size_bytes / args.images / 1024, 1),
            "generation_s": round(made, 2),
        },  # fmt: skip
        "converter": {"name": "imagefolder", "max_image_side": args.max_image_side, "jpeg_quality": 95},
        "runs": runs,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    head = f"medclip-prep imagefolder, {args.images} JPEGs {args.width}x{args.height} -> max side {args.max_image_side}"
    print(f"{head}, {info['cores']} cores ({info['cpu']}), load {info['load_avg_1m_before']}")
    print(table(result))
