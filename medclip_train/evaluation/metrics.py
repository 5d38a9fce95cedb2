"""Classification metrics with CLIP_benchmark's definitions, computed by scikit-learn.

Single-label: top-1 and top-5 accuracy (top-5 only with 5 or more classes, as CLIP_benchmark), balanced accuracy
(mean per-class recall, CLIP_benchmark's ``mean_per_class_recall``), macro-F1, and AUROC (binary, or macro
one-vs-rest) on softmax probabilities. Multi-label: mAP (CLIP_benchmark's ``mean_average_precision``; a class
without positives counts as AP 0 there and in scikit-learn) and macro AUROC over classes with both outcomes.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from sklearn.metrics import (
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

ZERO_SHOT_LOGIT_SCALE = 100.0
"""CLIP_benchmark's fixed logit scale for zero-shot logits (``100. * image_features @ classifier``)."""


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """CLIP_benchmark's ``accuracy``: the target is among the ``k`` highest logits (``torch.topk``)."""
    pred = logits.topk(k, dim=1).indices
    return (pred == targets.view(-1, 1)).any(dim=1).double().mean().item()


def softmax_probabilities(logits) -> np.ndarray:
    # float64: with a logit scale of 100 float32 softmax saturates to exact 0/1, which creates false AUROC ties.
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1).numpy()


def one_vs_rest_auroc(targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(C,) AUROC of each class against the rest; NaN for a class absent from (or the only class in) ``targets``.

    Equal to scikit-learn's ``roc_auc_score(..., multi_class="ovr", average=None)`` when all classes occur, which
    raises otherwise; here an absent class is left out instead, so a small test split still gets a number.
    """
    out = np.full(probs.shape[1], np.nan)
    for c in range(probs.shape[1]):
        positive = targets == c
        if positive.any() and not positive.all():
            out[c] = roc_auc_score(positive, probs[:, c])
    return out


def classification_metrics(logits, targets, classnames: list[str] | None = None) -> dict:
    """Metrics of single-label predictions.

    Args:
        logits: (N, C) scores; zero-shot uses ``100 * cosine`` like CLIP_benchmark (probabilities are their softmax).
        targets: (N,) class indices.
        classnames: names for the per-class table (default: indices).

    Returns:
        ``top1``, ``top5`` (C >= 5), ``balanced_acc``, ``macro_f1``, ``auroc``, ``n``, ``num_classes``, and
        ``per_class`` (list of rows) and ``confusion_matrix`` (C x C list, rows = true class).
    """
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float32)
    targets_t = torch.as_tensor(np.asarray(targets), dtype=torch.int64)
    y = targets_t.numpy()
    num_classes = logits.shape[1]
    pred = logits.argmax(dim=1).numpy()
    probs = softmax_probabilities(logits)
    with warnings.catch_warnings():  # classes absent from a small split make sklearn warn; the numbers are defined
        warnings.simplefilter("ignore")
        metrics = {
            "top1": topk_accuracy(logits, targets_t, 1),
            "balanced_acc": float(balanced_accuracy_score(y, pred)),
            "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        }
        if num_classes >= 5:
            metrics["top5"] = topk_accuracy(logits, targets_t, 5)
        if num_classes == 2:
            auroc_per_class = one_vs_rest_auroc(y, probs)  # both entries equal the binary AUROC on p(class 1)
            metrics["auroc"] = float(roc_auc_score(y, probs[:, 1])) if len(np.unique(y)) == 2 else math.nan
        else:
            auroc_per_class = one_vs_rest_auroc(y, probs)
            metrics["auroc"] = _nanmean(auroc_per_class)
        labels = list(range(num_classes))
        precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    metrics["n"] = int(len(y))
    metrics["num_classes"] = num_classes
    names = classnames or [str(c) for c in labels]
    metrics["per_class"] = [
        {
            "class": names[c],
            "support": int(support[c]),
            "precision": float(precision[c]),
            "recall": float(recall[c]),
            "f1": float(f1[c]),
            "auroc": float(auroc_per_class[c]),
        }
        for c in labels
    ]
    metrics["confusion_matrix"] = confusion_matrix(y, pred, labels=labels).tolist()
    return metrics


def multilabel_metrics(scores, targets, classnames: list[str] | None = None) -> dict:
    """Metrics of multi-label scores (N, C) against multi-hot targets (N, C): ``mAP``, ``auroc``, per class.

    AP per class is scikit-learn's ``average_precision_score`` (equal to CLIP_benchmark's
    ``average_precision_per_class`` when scores have no ties); ``mAP`` is their mean over all classes.
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets).astype(np.int64)
    num_classes = scores.shape[1]
    ap = np.zeros(num_classes)
    auroc = np.full(num_classes, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no positive class found": AP is 0 then, as in CLIP_benchmark
        for c in range(num_classes):
            ap[c] = average_precision_score(targets[:, c], scores[:, c]) if targets[:, c].any() else 0.0
            if 0 < targets[:, c].sum() < len(targets):
                auroc[c] = roc_auc_score(targets[:, c], scores[:, c])
    names = classnames or [str(c) for c in range(num_classes)]
    return {
        "mAP": float(ap.mean()),
        "auroc": _nanmean(auroc),
        "n": int(len(targets)),
        "num_classes": num_classes,
        "per_class": [
            {"class": names[c], "support": int(targets[:, c].sum()), "ap": float(ap[c]), "auroc": float(auroc[c])}
            for c in range(num_classes)
        ],
    }


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else math.nan


SUMMARY_KEYS = ("top1", "top5", "balanced_acc", "macro_f1", "auroc", "mAP", "n")
"""The scalar metrics of a classification result (the rest are tables)."""


def scalar_metrics(result: dict) -> dict[str, float]:
    return {k: result[k] for k in SUMMARY_KEYS if k in result}
