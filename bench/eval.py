"""Evaluator benchmark: zero-shot throughput of the tiny model, and chunked retrieval time and memory.

``python -m bench eval [--sizes 10000 100000] [--dim 512] [--images 512] [--batch-size 64] [--chunk-size N]``

Zero-shot: a generated image folder (4 classes of random PNGs) through ``evaluate_zeroshot`` end to end (decode,
preprocess, encode, classify) and the image tower's forward alone, at batch 64. Retrieval: ``retrieval_metrics``
both ways on N random L2-normalised embeddings per side; memory is the peak RSS above the RSS after the embeddings
exist (torch allocations are invisible to tracemalloc), next to the size the full N x N float32 matrix would have.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bench.common import PeakRSS, machine_info, markdown_table, write_result
from data_prep.tokenizer import train_wordpiece

SENTENCES = [
    "a chest x-ray showing pneumonia",
    "an MRI of the brain",
    "a CT scan of the abdomen",
    "histopathology image of lymph node tissue",
    "a photo of a red green blue class",
]


def build_tiny(workdir: Path):
    import open_clip
    import torch

    from medclip_train.config import ModelConfig
    from medclip_train.model.factory import build_model

    train_wordpiece(SENTENCES, workdir / "tokenizer", vocab_size=300)
    torch.manual_seed(0)
    built = build_model(ModelConfig(preset="tiny", tokenizer=str(workdir / "tokenizer")))
    preprocess = open_clip.transform.image_transform_v2(
        open_clip.transform.PreprocessCfg(**built.preprocess_cfg), is_train=False
    )
    return built.model.eval(), built.tokenizer, preprocess


def write_image_folder(root: Path, n: int, size: int = 224) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    classes = ["xray", "ct", "mri", "histology"]
    for i in range(n):
        folder = root / classes[i % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
    prompts = {"classnames": {c: c for c in classes}, "templates": ["a photo of {c}.", "an image of a {c}."]}
    (root / "prompts.json").write_text(json.dumps(prompts))
    return root


def bench_zeroshot(n_images: int, batch_size: int, workers: int) -> dict:
    import torch

    from medclip_train.evaluation.datasets import open_classification
    from medclip_train.evaluation.features import Encoder
    from medclip_train.evaluation.zeroshot import evaluate_zeroshot

    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, preprocess = build_tiny(Path(tmp))
        data = open_classification(write_image_folder(Path(tmp) / "task", n_images))
        encoder = Encoder(model, tokenizer, preprocess, batch_size=batch_size, workers=workers)
        evaluate_zeroshot(encoder, data, max_samples=batch_size)  # warm-up: thread pool, kernels
        t = time.perf_counter()
        result = evaluate_zeroshot(encoder, data)
        end_to_end = time.perf_counter() - t
        images = torch.randn(batch_size, 3, 160, 160)
        with torch.no_grad():
            model.encode_image(images, normalize=True)
            t, reps = time.perf_counter(), 5
            for _ in range(reps):
                model.encode_image(images, normalize=True)
            forward = (time.perf_counter() - t) / reps
    return {
        "images": result["n"],
        "batch_size": batch_size,
        "workers": workers,
        "end_to_end_images_per_s": round(result["n"] / end_to_end, 1),
        "forward_images_per_s": round(batch_size / forward, 1),
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
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, help="queries per chunk (default: the evaluator's 128 MiB budget)")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    result = {"machine": machine_info(), "torch_threads": torch.get_num_threads(), "command": "python -m bench eval"}
    result["zeroshot"] = bench_zeroshot(args.images, args.batch_size, args.workers)
    result["retrieval"] = []
    for n in args.sizes:
        result["retrieval"].append(bench_retrieval(n, args.dim, args.chunk_size))
        print(f"[bench] retrieval N={n}: {result['retrieval'][-1]['seconds']} s", flush=True)
    path = write_result("eval", result)

    z = result["zeroshot"]
    print(
        markdown_table(
            ["zero-shot (tiny, 160 px)", "images", "batch", "workers", "end-to-end img/s", "forward img/s"],
            [
                [
                    "evaluate_zeroshot",
                    z["images"],
                    z["batch_size"],
                    z["workers"],
                    z["end_to_end_images_per_s"],
                    z["forward_images_per_s"],
                ]
            ],
        )
    )
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
