"""The library entry of training's in-loop evaluation and of ``medclip-eval all``: flat metric names."""

from __future__ import annotations

from pathlib import Path

from medclip_train.evaluation.datasets import open_classification, open_retrieval
from medclip_train.evaluation.features import Encoder
from medclip_train.evaluation.metrics import scalar_metrics
from medclip_train.evaluation.retrieval import evaluate_retrieval
from medclip_train.evaluation.zeroshot import evaluate_zeroshot

RETRIEVAL_KEYS = ("R@1", "R@5", "R@10", "mean_rank", "median_rank")


def evaluate_suite(
    model,
    tokenizer,
    preprocess,
    zeroshot_tasks: list[str],
    retrieval_shards: str | None,
    device="cpu",
    batch_size: int = 64,
    max_samples: int | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Zero-shot on each task folder and retrieval on the shards, without cache or files.

    Args:
        model: open_clip-style model (``encode_image``/``encode_text`` with ``normalize``), on ``device``.
        tokenizer: callable list[str] -> (N, L) token ids.
        preprocess: the eval image transform.
        zeroshot_tasks: image folders ``<task>/<class>/*`` with a ``prompts.json`` (or ``.yaml``).
        retrieval_shards: brace/glob pattern of project shards with ``.txt`` captions, or ``None``.
        max_samples: images per task (and for retrieval) at most, to keep in-loop evaluation fast.

    Returns:
        ``zeroshot/<task>/{top1,top5,balanced_acc,macro_f1,auroc}`` (``mAP`` for multi-label tasks; ``top5`` with
        5+ classes) and ``retrieval/{i2t,t2i}_{R@1,R@5,R@10,mean_rank,median_rank}``. The model's train/eval mode
        is restored on return.
    """
    was_training = model.training
    encoder = Encoder(model, tokenizer, preprocess, device=device, batch_size=batch_size, progress=progress)
    metrics: dict[str, float] = {}
    try:
        for task in zeroshot_tasks:
            result = evaluate_zeroshot(encoder, open_classification(task), max_samples=max_samples)
            metrics.update(flat_zeroshot_metrics(Path(task).name, result))
        if retrieval_shards:
            result = evaluate_retrieval(encoder, open_retrieval(retrieval_shards), max_samples=max_samples)
            metrics.update(flat_retrieval_metrics(result["full"]))
    finally:
        model.train(was_training)
    return metrics


def flat_zeroshot_metrics(task: str, result: dict) -> dict[str, float]:
    """``zeroshot/<task>/<metric>`` for the scalar metrics of one zero-shot result."""
    return {f"zeroshot/{task}/{k}": float(v) for k, v in scalar_metrics(result).items() if k != "n"}


def flat_retrieval_metrics(metrics: dict) -> dict[str, float]:
    """``retrieval/{i2t,t2i}_<metric>`` from :func:`~medclip_train.evaluation.retrieval.retrieval_metrics`."""
    return {f"retrieval/{d}_{k}": float(metrics[f"{d}_{k}"]) for d in ("i2t", "t2i") for k in RETRIEVAL_KEYS}
