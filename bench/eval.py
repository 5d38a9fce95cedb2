"""Evaluator benchmark: ``medclip-eval suite``'s zero-shot images/s against the image forward alone; retrieval.

``python -m bench eval [--preset bench_cpu_vit_tiny_bert_mini|tiny] [--images 512] [--batch-size 64] [--workers N]
[--sizes 10000 100000] [--dim 512] [--chunk-size N]``

Zero-shot: the suite itself (``medclip_train.evaluation.cli.main``, what the ``medclip-eval`` console script runs) on
a project checkpoint of ``--preset`` (seeded, untrained; default the CPU benchmark model of ``bench train``, vit_tiny
at 224 px, with a WordPiece tokenizer trained here) over a catalog of one class-folder dataset with the zero-shot task
only, a fresh feature cache, and the suite's default loader workers (the available cores) unless ``--workers``.
A first suite run on one batch warms imports, threads and kernels up. The images are files as medical sets hold them,
with smooth structure that compresses like real scans (not incompressible noise), in turn: greyscale PNG 512 px
(radiograph-like: body outline, ribs, film grain), greyscale JPEG 384 x 448 (ultrasound-like: speckled cone), RGB
JPEG 256-512 px (histology-like stained nuclei), RGB PNG 320 px (dermoscopy-like lesion on skin). Reported, as
images/s: the whole command (model load, prompts, encoding, metrics with the 1000-resample bootstrap, report), its
image-encoding stage (the suite's ``Encoder`` pass: read, decode and resize in the loader workers, normalise,
forward), and the model's image forward alone on the same batches (the same files through the eval transform,
decoded beforehand, same process and threads; timed just before and just after the suite, averaged), with each
ratio to the forward; and the CPU ms per image of the encoding stage (loader workers included) and of the forward.
Retrieval: ``retrieval_metrics`` both ways on N random L2-normalised embeddings per side; memory is the peak RSS
above the RSS after the embeddings exist (torch allocations are invisible to tracemalloc), next to the size the full
N x N float32 matrix would have.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import time
from pathlib import Path

from bench.common import PeakRSS, machine_info, markdown_table, write_result
from data_prep.tokenizer import train_wordpiece

DEFAULT_PRESET = "bench_cpu_vit_tiny_bert_mini"
CLASSES = {
    "xray": "a chest radiograph",
    "ultrasound": "a breast ultrasound image",
    "histology": "an H&E stained histology slide",
    "dermoscopy": "a dermoscopy image of a skin lesion",
}
TEMPLATES = ["a photo of {c}.", "{c}", "a medical image: {c}."]
SENTENCES = [
    "a chest x-ray showing pneumonia",
    "an MRI of the brain",
    "a CT scan of the abdomen",
    "histopathology image of lymph node tissue",
    *(t.replace("{c}", c) for c in CLASSES.values() for t in TEMPLATES),
]


def save_checkpoint(workdir: Path, preset: str) -> Path:
    """A project checkpoint of ``preset`` (seeded, untrained) with a tokenizer trained here: what the suite loads."""
    import lightning as L

    from medclip_train.config import ModelConfig
    from medclip_train.module import CLIPModule

    train_wordpiece(SENTENCES, workdir / "tokenizer", vocab_size=300)
    L.seed_everything(0, verbose=False)
    module = CLIPModule(ModelConfig(preset=preset, tokenizer=str(workdir / "tokenizer")))
    trainer = L.Trainer(accelerator="cpu", max_steps=0, logger=False, enable_checkpointing=False)
    trainer.strategy.connect(module)
    trainer.strategy._lightning_module = module
    path = workdir / f"{preset}.ckpt"
    trainer.save_checkpoint(path)
    return path


def medical_image(kind: str, rng):
    """One synthetic scan of ``kind`` (a key of CLASSES) as a PIL image and its file format."""
    import numpy as np
    from PIL import Image, ImageFilter

    def blur(a, radius):
        return np.asarray(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius)))

    if kind == "xray":
        h = w = 512
        yy, xx = np.mgrid[:h, :w] / h
        body = np.exp(-((((xx - 0.5) / 0.38) ** 2 + ((yy - 0.55) / 0.5) ** 4) ** 2))
        lungs = sum(np.exp(-(((xx - cx) / 0.13) ** 2 + ((yy - 0.5) / 0.28) ** 2)) for cx in (0.33, 0.67))
        ribs = 0.5 + 0.5 * np.sin(2 * np.pi * (yy * 9 + 0.8 * np.abs(xx - 0.5) + rng.random()))
        a = 40 + 170 * body - 90 * lungs * (0.6 + 0.4 * ribs) + rng.normal(0, 6, (h, w))
        return Image.fromarray(blur(a, 1.2)), "PNG"
    if kind == "ultrasound":
        h, w = 384, 448
        yy, xx = np.mgrid[:h, :w]
        angle, radius = np.arctan2(xx - w / 2, yy + 20), np.hypot(xx - w / 2, yy + 20)
        cone = (np.abs(angle) < 0.6) & (radius < h)
        speckle = blur(rng.gamma(2.0, 45, (h, w)), 1.5)
        lesion = np.exp(-(((xx - w * rng.uniform(0.4, 0.6)) / 40) ** 2 + ((yy - h * 0.55) / 30) ** 2))
        return Image.fromarray(blur(cone * speckle * (1 - 0.8 * lesion), 0.8)), "JPEG"
    if kind == "histology":
        from PIL import ImageDraw

        side = int(rng.choice([256, 384, 512]))
        image = Image.new("RGB", (side, side), (235, 200, 220))
        draw = ImageDraw.Draw(image)
        for cy, cx, r in zip(rng.uniform(0, side, 80), rng.uniform(0, side, 80), rng.uniform(3, 9, 80)):
            shade = tuple(int(v) for v in rng.integers(60, 140, 3) * np.array([1.0, 0.5, 1.3]))
            draw.ellipse((cx - r, cy - 0.8 * r, cx + r, cy + 0.8 * r), fill=shade)
        a = np.asarray(image.filter(ImageFilter.GaussianBlur(2)), dtype=np.float64) + rng.normal(0, 5, (side, side, 3))
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)), "JPEG"
    side = 320
    yy, xx = np.mgrid[:side, :side] / side
    lesion = np.exp(-((((xx - 0.5) / rng.uniform(0.15, 0.3)) ** 2 + ((yy - 0.5) / 0.2) ** 2) ** 1.5))[..., None]
    skin, spot = np.array([225, 175, 150]), np.array([110, 60, 40])
    a = skin * (1 - lesion) + spot * lesion + rng.normal(0, 4, (side, side, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.5)), "PNG"


def write_image_folder(root: Path, n: int) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    kinds = list(CLASSES)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        image, fmt = medical_image(kind, rng)
        (root / kind).mkdir(parents=True, exist_ok=True)
        image.save(
            root / kind / f"{i:05d}.{'png' if fmt == 'PNG' else 'jpg'}", **({"quality": 90} if fmt == "JPEG" else {})
        )
    (root / "prompts.json").write_text(json.dumps({"classnames": CLASSES, "templates": TEMPLATES}))
    return root


def run_suite(checkpoint: Path, catalog: Path, data_root: Path, out: Path, extra: list[str]) -> float:
    from medclip_train.evaluation import cli

    args = ["suite", "--models", checkpoint, "--catalog", catalog, "--data-root", data_root, "--output", out]
    with contextlib.redirect_stdout(io.StringIO()):
        t = time.perf_counter()
        code = cli.main([str(a) for a in [*args, "--device", "cpu", "--no-progress", *extra]])
        seconds = time.perf_counter() - t
    if code != 0:
        raise SystemExit(f"bench eval: medclip-eval suite exited with {code}")
    return seconds


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the loader workers, joined when their loader is done)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@contextlib.contextmanager
def encoding_clock():
    """Adds up the wall and CPU seconds the suite's Encoder spends encoding images (cache misses), without changing
    what it does."""
    from medclip_train.evaluation.features import Encoder

    spent, original = {"wall": 0.0, "cpu": 0.0}, Encoder._encode_images

    def timed(self, *args, **kwargs):
        t, c = time.perf_counter(), cpu_seconds()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent["wall"] += time.perf_counter() - t
            spent["cpu"] += cpu_seconds() - c

    Encoder._encode_images = timed
    try:
        yield spent
    finally:
        Encoder._encode_images = original


class ForwardOnly:
    """The image tower's forward alone over the suite's images, batched as the suite batches them: the same files
    through the model's eval transform, decoded beforehand, in this process with its threads."""

    def __init__(self, checkpoint: Path, folder: Path, batch_size: int):
        import torch

        from medclip_train.evaluation.datasets import ImageFolderSource
        from medclip_train.evaluation.model_source import load_for_eval

        loaded = load_for_eval(str(checkpoint), None, "cpu", False)
        self.model = loaded.model.eval()
        dataset = ImageFolderSource(folder).torch_dataset(loaded.preprocess)
        images = [dataset[i][0] for i in range(len(dataset))]
        self.batches = [torch.stack(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        self()  # warm-up

    def __call__(self) -> tuple[float, float]:
        """(wall, CPU) seconds of one pass."""
        import torch

        with torch.no_grad():
            t, c = time.perf_counter(), cpu_seconds()
            for batch in self.batches:
                self.model.encode_image(batch, normalize=True)
            return time.perf_counter() - t, cpu_seconds() - c


def bench_zeroshot(preset: str, n_images: int, batch_size: int, workers: int | None) -> dict:
    import yaml

    from medclip_train.evaluation.distributed import default_workers

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = save_checkpoint(tmp, preset)
        t = time.perf_counter()
        write_image_folder(tmp / "data" / "scans", n_images)
        print(f"[bench] {n_images} images written in {time.perf_counter() - t:.0f} s", flush=True)
        catalog = tmp / "catalog.yaml"
        entry = {"name": "scans", "layout": "imagefolder", "path": "scans", "tasks": ["zeroshot"], "modality": "mixed"}
        catalog.write_text(yaml.safe_dump({"datasets": [entry]}))
        extra = ["--batch-size", str(batch_size)] + ([] if workers is None else ["--workers", str(workers)])
        run_suite(checkpoint, catalog, tmp / "data", tmp / "warmup", [*extra, "--max-samples", str(batch_size)])
        forward = ForwardOnly(checkpoint, tmp / "data" / "scans", batch_size)
        # Forward timed just before and just after the suite, averaged: a load that changes meanwhile moves both.
        before = forward()
        with encoding_clock() as encoding:
            whole = run_suite(checkpoint, catalog, tmp / "data", tmp / "suite", extra)
        after = forward()
        result = json.loads((tmp / "suite" / "results.json").read_text())["results"][checkpoint.stem]["scans"]
    n = result["zeroshot"]["n"]
    forward_wall, forward_cpu = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
    return {
        "preset": preset,
        "images": n,
        "batch_size": batch_size,
        "workers": default_workers() if workers is None else workers,
        "suite_seconds": round(whole, 2),
        "suite_images_per_s": round(n / whole, 1),
        "encoding_images_per_s": round(n / encoding["wall"], 1),
        "forward_images_per_s": round(n / forward_wall, 1),
        "forward_images_per_s_before_after": [round(n / before[0], 1), round(n / after[0], 1)],
        "suite_vs_forward": round(forward_wall / whole, 3),
        "encoding_vs_forward": round(forward_wall / encoding["wall"], 3),
        # CPU ms per image (all threads and loader workers): what the decoding adds to the forward's work, which a
        # loaded machine does not hide the way it skews wall-clock ratios.
        "encoding_cpu_ms_per_image": round(1000 * encoding["cpu"] / n, 2),
        "forward_cpu_ms_per_image": round(1000 * forward_cpu / n, 2),
    }


def bench_retrieval(n: int, dim: int, chunk_size: int | None) -> dict:
    import torch
    import torch.nn.functional as F

    from medclip_train.evaluation.retrieval import SCORE_BUDGET, retrieval_metrics

    gen = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    texts = F.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    with PeakRSS(os.getpid(), interval=0.01) as baseline:
        time.sleep(0.05)
    with PeakRSS(os.getpid(), interval=0.01) as peak:
        t = time.perf_counter()
        metrics = retrieval_metrics(images, texts, chunk_size=chunk_size)
        seconds = time.perf_counter() - t
    used_chunk = min(n, chunk_size or max(1, SCORE_BUDGET // n))
    return {
        "n": n,
        "dim": dim,
        "chunk_size": used_chunk,
        "seconds": round(seconds, 2),
        "queries_per_s": round(2 * n / seconds, 1),
        "peak_rss_delta_mib": round(peak.peak_mb - baseline.peak_mb, 1),
        "chunk_scores_mib": round(used_chunk * n * 4 / 2**20, 1),
        "embeddings_mib": round(2 * n * dim * 4 / 2**20, 1),
        "full_matrix_mib": round(n * n * 4 / 2**20, 1),
        "i2t_R@1": metrics["i2t_R@1"],
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench eval", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default=DEFAULT_PRESET, help="model preset (default: %(default)s; or tiny)")
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000], help="retrieval N (none: skip)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, help="queries per chunk (default: the evaluator's 128 MiB budget)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, help="loader workers (default: the suite's, the available cores)")
    args = parser.parse_args(argv)

    import torch

    result = {"machine": machine_info(), "torch_threads": torch.get_num_threads(), "command": "python -m bench eval"}
    result["zeroshot"] = bench_zeroshot(args.preset, args.images, args.batch_size, args.workers)
    result["retrieval"] = []
    for n in args.sizes:
        result["retrieval"].append(bench_retrieval(n, args.dim, args.chunk_size))
        print(f"[bench] retrieval N={n}: {result['retrieval'][-1]['seconds']} s", flush=True)
    path = write_result("eval", result)

    z = result["zeroshot"]
    print(
        markdown_table(
            [
                f"zero-shot ({z['preset']})",
                "images",
                "batch",
                "workers",
                "suite img/s",
                "encoding img/s",
                "forward img/s",
                "suite / forward",
                "encoding / forward",
                "CPU ms/img encoding / forward",
            ],
            [
                [
                    "medclip-eval suite",
                    z["images"],
                    z["batch_size"],
                    z["workers"],
                    z["suite_images_per_s"],
                    z["encoding_images_per_s"],
                    z["forward_images_per_s"],
                    f"{100 * z['suite_vs_forward']:.0f}%",
                    f"{100 * z['encoding_vs_forward']:.0f}%",
                    f"{z['encoding_cpu_ms_per_image']} / {z['forward_cpu_ms_per_image']}",
                ]
            ],
        )
    )
    if result["retrieval"]:
        print()
        print(
            markdown_table(
                [
                    "retrieval N (x N)",
                    "dim",
                    "chunk",
                    "time s (both ways)",
                    "queries/s",
                    "peak RSS +MiB",
                    "chunk scores MiB",
                    "full matrix MiB",
                ],
                [
                    [
                        r["n"],
                        r["dim"],
                        r["chunk_size"],
                        r["seconds"],
                        r["queries_per_s"],
                        r["peak_rss_delta_mib"],
                        r["chunk_scores_mib"],
                        r["full_matrix_mib"],
                    ]
                    for r in result["retrieval"]
                ],
            )
        )
    print(f"\nmachine: {result['machine']}; torch threads {result['torch_threads']}; written {path}")
