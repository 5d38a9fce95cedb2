"""The one evaluation loop of training's in-loop evaluation and of ``medclip-eval all``.

:func:`run_suite` runs zero-shot on each task folder and retrieval on the shards. Training logs the flat metric
names of :func:`evaluate_suite`; ``medclip-eval all`` (evaluation/cli.py) adds the 95% intervals, chance levels and
result files.
"""

from __future__ import annotations

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
    try:
        zeroshot, retrieval = run_suite(encoder, zeroshot_tasks, retrieval_shards, max_samples=max_samples)
    finally:
        model.train(was_training)
    metrics: dict[str, float] = {}
    for name, result in zeroshot.items():
        metrics.update(flat_zeroshot_metrics(name, result))
    if retrieval is not None:
        metrics.update(flat_retrieval_metrics(retrieval["full"]))
    return metrics


def run_suite(
    encoder: Encoder,
    zeroshot_tasks: list[str],
    retrieval_shards: str | None,
    max_samples: int | None = None,
    chunk_size: int | None = None,
    bootstrap: int = 0,
) -> tuple[dict[str, dict], dict | None]:
    """Zero-shot on each task folder and retrieval on the shards (``None``: none).

    Returns:
        The zero-shot results by task name (the folder's name) and the retrieval result, or ``None``.
    """
    zeroshot = {}
    for task in zeroshot_tasks:
        data = open_classification(task)
        zeroshot[data.name] = evaluate_zeroshot(encoder, data, max_samples=max_samples, bootstrap=bootstrap)
    retrieval = None
    if retrieval_shards:
        retrieval = evaluate_retrieval(
            encoder,
            open_retrieval(retrieval_shards),
            max_samples=max_samples,
            chunk_size=chunk_size,
            bootstrap=bootstrap,
        )
    return zeroshot, retrieval


def flat_zeroshot_metrics(task: str, result: dict) -> dict[str, float]:
    """``zeroshot/<task>/<metric>`` for the scalar metrics of one zero-shot result."""
    return {f"zeroshot/{task}/{k}": float(v) for k, v in scalar_metrics(result).items() if k != "n"}


def flat_retrieval_metrics(metrics: dict) -> dict[str, float]:
    """``retrieval/{i2t,t2i}_<metric>`` from :func:`~medclip_train.evaluation.retrieval.retrieval_metrics`."""
    return {f"retrieval/{d}_{k}": float(metrics[f"{d}_{k}"]) for d in ("i2t", "t2i") for k in RETRIEVAL_KEYS}
