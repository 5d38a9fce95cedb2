"""Classification metrics with CLIP_benchmark's definitions, computed by scikit-learn.

Single-label: top-1 and top-5 accuracy (top-5 only with 5 or more classes, as CLIP_benchmark), balanced accuracy
(mean per-class recall, CLIP_benchmark's ``mean_per_class_recall``), macro-F1, and AUROC (binary, or macro
one-vs-rest) on softmax probabilities. Multi-label: mAP (CLIP_benchmark's ``mean_average_precision``; a class
without positives counts as AP 0 there and in scikit-learn) and macro AUROC over classes with both outcomes.

Every result carries ``chance``: what a model that ignores the image scores on the same targets (see
:func:`classification_chance`), and on request ``ci95``: percentile bootstrap intervals over the test samples
(:func:`bootstrap_weights`), for test sets of at most :data:`BOOTSTRAP_MAX_N` samples.
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

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
BOOTSTRAP_LEVEL = 0.95
BOOTSTRAP_MAX_N = 5000
"""Intervals are computed for test sets up to this size: above it the sampling error of the metrics is below
about 0.014 (95% half-width of an accuracy near 0.5), and 1000 resamples of (n,) weights cost 8 n kB."""


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


def classification_metrics(
    logits, targets, classnames: list[str] | None = None, bootstrap: int = 0, seed: int = BOOTSTRAP_SEED
) -> dict:
    """Metrics of single-label predictions.

    Args:
        logits: (N, C) scores; zero-shot uses ``100 * cosine`` like CLIP_benchmark (probabilities are their softmax).
        targets: (N,) class indices.
        classnames: names for the per-class table (default: indices).
        bootstrap: resamples of the 95% intervals (0: none; none either above ``BOOTSTRAP_MAX_N`` samples).

    Returns:
        ``top1``, ``top5`` (C >= 5), ``balanced_acc``, ``macro_f1``, ``auroc``, ``n``, ``num_classes``,
        ``chance`` (the same metrics for a model that ignores the image), ``per_class`` (list of rows, with the
        class ``prevalence``) and ``confusion_matrix`` (C x C list, rows = true class); with ``bootstrap``,
        ``ci95`` (``[low, high]`` per metric) and ``bootstrap`` (its settings).
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
    metrics["chance"] = classification_chance(y, num_classes)
    if bootstrap and 0 < len(y) <= BOOTSTRAP_MAX_N:
        metrics["ci95"] = classification_intervals(logits, y, bootstrap_weights(len(y), bootstrap, seed))
        metrics["bootstrap"] = bootstrap_settings(bootstrap, seed)
    names = classnames or [str(c) for c in labels]
    metrics["per_class"] = [
        {
            "class": names[c],
            "support": int(support[c]),
            "prevalence": float(support[c] / max(len(y), 1)),
            "precision": float(precision[c]),
            "recall": float(recall[c]),
            "f1": float(f1[c]),
            "auroc": float(auroc_per_class[c]),
        }
        for c in labels
    ]
    metrics["confusion_matrix"] = confusion_matrix(y, pred, labels=labels).tolist()
    return metrics


def multilabel_metrics(
    scores, targets, classnames: list[str] | None = None, bootstrap: int = 0, seed: int = BOOTSTRAP_SEED
) -> dict:
    """Metrics of multi-label scores (N, C) against multi-hot targets (N, C): ``mAP``, ``auroc``, per class.

    AP per class is scikit-learn's ``average_precision_score`` (equal to CLIP_benchmark's
    ``average_precision_per_class`` when scores have no ties); ``mAP`` is their mean over all classes.
    ``chance``, ``ci95`` and ``bootstrap`` as in :func:`classification_metrics`.
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
    prevalence = targets.mean(axis=0) if len(targets) else np.zeros(num_classes)
    result = {
        "mAP": float(ap.mean()),
        "auroc": _nanmean(auroc),
        "n": int(len(targets)),
        "num_classes": num_classes,
        # A random ranking's AP is, in expectation, about the class's prevalence (exactly so as N grows).
        "chance": {"mAP": float(prevalence.mean()), "auroc": 0.5},
    }
    if bootstrap and 0 < len(targets) <= BOOTSTRAP_MAX_N:
        weights = bootstrap_weights(len(targets), bootstrap, seed)
        ap_b = np.stack(
            [weighted_average_precision(weights, targets[:, c] > 0, scores[:, c]) for c in range(num_classes)]
        )
        auroc_b = np.stack([weighted_auroc(weights, targets[:, c] > 0, scores[:, c]) for c in range(num_classes)])
        result["ci95"] = {
            "mAP": percentile_interval(ap_b.mean(axis=0)),
            "auroc": percentile_interval(_nanmean_rows(auroc_b.T)),
        }
        result["bootstrap"] = bootstrap_settings(bootstrap, seed)
    result["per_class"] = [
        {
            "class": names[c],
            "support": int(targets[:, c].sum()),
            "prevalence": float(prevalence[c]),
            "ap": float(ap[c]),
            "auroc": float(auroc[c]),
        }
        for c in range(num_classes)
    ]
    return result


# ------------------------------------------------------------------------------------------ chance and bootstrap


def classification_chance(targets: np.ndarray, num_classes: int) -> dict[str, float]:
    """The metrics of a classifier that ignores the image, on these targets: the baseline a figure must beat.

    top-1 (top-5): always answering the most frequent class (5 classes), i.e. the largest class share (sum of the
    5 largest). Balanced accuracy: 1/C (any guess that ignores the image has expected recall 1/C per class).
    Macro-F1: a uniform random guess, whose class c has precision p_c (its prevalence) and recall 1/C, so
    F1_c = 2 p_c / (C p_c + 1), averaged over the C classes. AUROC: 0.5.
    """
    targets = np.asarray(targets)
    share = np.bincount(targets, minlength=num_classes) / max(len(targets), 1)
    chance = {
        "top1": float(share.max()) if len(targets) else math.nan,
        "balanced_acc": 1.0 / num_classes,
        "macro_f1": float(np.mean(2 * share / (num_classes * share + 1))),
        "auroc": 0.5,
    }
    if num_classes >= 5:
        chance["top5"] = float(np.sort(share)[-5:].sum())
    return chance


def bootstrap_settings(resamples: int, seed: int) -> dict:
    return {"resamples": int(resamples), "seed": int(seed), "level": BOOTSTRAP_LEVEL, "method": "percentile"}


def bootstrap_weights(n: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """(resamples, n) float64: how often each test sample is drawn in each resample (n draws with replacement).

    A metric of a resample equals the metric of the original samples weighted by these counts, which lets every
    metric below be computed for all resamples at once, with a fixed seed (same intervals on every run).
    """
    draws = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    draws += np.arange(resamples)[:, None] * n
    return np.bincount(draws.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def percentile_interval(values, level: float = BOOTSTRAP_LEVEL) -> list[float]:
    """``[low, high]``: the (1 - level)/2 and (1 + level)/2 percentiles of the resampled values (NaNs left out)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if not len(values):
        return [math.nan, math.nan]
    tail = 100 * (1 - level) / 2
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def classification_intervals(logits, targets: np.ndarray, weights: np.ndarray) -> dict[str, list[float]]:
    """95% percentile intervals of top-1, top-5 (C >= 5), balanced accuracy, macro-F1 and AUROC.

    The same definitions as :func:`classification_metrics` (scikit-learn's: balanced accuracy over the classes
    present in a resample's targets, macro-F1 over those in its targets or predictions, AUROC as there).
    """
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float32)
    y = np.asarray(targets)
    n, num_classes = logits.shape
    pred = logits.argmax(dim=1).numpy()
    total = weights.sum(axis=1)
    correct = (pred == y).astype(np.float64)
    out = {"top1": percentile_interval(weights @ correct / total)}
    if num_classes >= 5:
        in_top5 = (logits.topk(5, dim=1).indices.numpy() == y[:, None]).any(axis=1).astype(np.float64)
        out["top5"] = percentile_interval(weights @ in_top5 / total)
    true_onehot = np.eye(num_classes)[y]
    true_count = weights @ true_onehot  # (B, C)
    pred_count = weights @ np.eye(num_classes)[pred]
    hits = weights @ (true_onehot * correct[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        out["balanced_acc"] = percentile_interval(_nanmean_rows(np.where(true_count > 0, hits / true_count, np.nan)))
        seen = (true_count + pred_count) > 0
        f1 = np.where(seen, 2 * hits / (true_count + pred_count), 0.0)
        out["macro_f1"] = percentile_interval(f1.sum(axis=1) / seen.sum(axis=1))
    probs = softmax_probabilities(logits)
    if num_classes == 2:
        out["auroc"] = percentile_interval(weighted_auroc(weights, y == 1, probs[:, 1]))
    else:
        per_class = np.stack([weighted_auroc(weights, y == c, probs[:, c]) for c in range(num_classes)], axis=1)
        out["auroc"] = percentile_interval(_nanmean_rows(per_class))
    return out


def _ranked_groups(weights: np.ndarray, positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, G) weights of positives and of negatives per distinct score, from the highest score down."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    ranked = np.asarray(scores, dtype=np.float64)[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    w = weights[:, order]
    pos = np.asarray(positive, dtype=bool)[order]
    return np.add.reduceat(w * pos, starts, axis=1), np.add.reduceat(w * ~pos, starts, axis=1)


def weighted_auroc(weights: np.ndarray, positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(B,) AUROC of ``scores`` for each row of sample weights: P(positive > negative) + P(tie) / 2.

    With unit weights this is scikit-learn's ``roc_auc_score`` (the trapezoidal ROC area counts ties as half);
    NaN where a row has no positive or no negative.
    """
    pos, neg = _ranked_groups(weights, positive, scores)
    num_pos, num_neg = pos.sum(axis=1), neg.sum(axis=1)
    negatives_below = num_neg[:, None] - np.cumsum(neg, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos * (negatives_below + 0.5 * neg)).sum(axis=1) / (num_pos * num_neg)
    return np.where((num_pos > 0) & (num_neg > 0), auc, np.nan)


def weighted_average_precision(weights: np.ndarray, positive: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(B,) average precision, sum over thresholds of (R_k - R_k-1) P_k, as scikit-learn's; 0 without positives."""
    pos, neg = _ranked_groups(weights, positive, scores)
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    num_pos = tp[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        ap = (pos * precision).sum(axis=1) / num_pos
    return np.where(num_pos > 0, ap, 0.0)


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Row means over the non-NaN entries; NaN for an all-NaN row (without numpy's warning)."""
    present = ~np.isnan(values)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(present, values, 0.0).sum(axis=1) / present.sum(axis=1)


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else math.nan


SUMMARY_KEYS = ("top1", "top5", "balanced_acc", "macro_f1", "auroc", "mAP", "n")
"""The scalar metrics of a classification result (the rest are tables)."""


def scalar_metrics(result: dict) -> dict[str, float]:
    return {k: result[k] for k in SUMMARY_KEYS if k in result}
