"""Frozen-feature probes of ``medclip-eval suite``, cross-validated as feature-probe studies report them.

Logistic regression, linear SVM and kNN are scored with stratified k-fold cross-validation (scikit-learn's
``cross_validate``): accuracy and macro F1 as mean +- std over the folds (``np.std``, ddof 0). The few-shot linear
probe draws k samples per class from each fold's training part and tests on the held-out fold, with the C sweep of
:func:`~medclip_train.evaluation.linear_probe.evaluate_linear_probe` (validation: the fold's other training samples).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_validate
from sklearn.neighbors import KNeighborsClassifier
from sklearn.svm import LinearSVC

from medclip_train.evaluation.linear_probe import evaluate_linear_probe
from medclip_train.evaluation.metrics import classification_chance

PROBE_SCORING = {"accuracy": "accuracy", "macro_f1": "f1_macro"}
MAX_ITER = 1000


def probe_estimators(knn_k: int, seed: int) -> dict:
    """The probes, at scikit-learn's default regularisation (C = 1), as the feature-probe studies run them."""
    return {
        "logreg": LogisticRegression(C=1.0, max_iter=MAX_ITER, random_state=seed),
        "linear_svm": LinearSVC(C=1.0, max_iter=MAX_ITER, random_state=seed),
        "knn": KNeighborsClassifier(n_neighbors=knn_k, metric="cosine"),
    }


def fold_splitter(targets: np.ndarray, folds: int, seed: int) -> StratifiedKFold | None:
    """Stratified k-fold, k lowered to the smallest class's size; ``None`` when a class has a single sample."""
    counts = np.bincount(targets)
    smallest = int(counts[counts > 0].min()) if len(counts) else 0
    n_splits = min(folds, smallest)
    if n_splits < 2 or len(np.unique(targets)) < 2:
        return None
    return StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)


def summary(values) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std()), "folds": values.tolist()}


def cross_validated_probes(
    features: np.ndarray, targets: np.ndarray, num_classes: int, folds: int = 5, knn_k: int = 20, seed: int = 0
) -> dict:
    """``{probe: {"accuracy": {mean, std, folds}, "macro_f1": {...}}}`` plus ``n_folds`` and ``chance``.

    ``{"skipped": reason}`` when the data cannot be split (a class with one sample, or one class only).
    """
    splitter = fold_splitter(targets, folds, seed)
    if splitter is None:
        return {"skipped": "fewer than 2 samples in a class, or a single class: no stratified folds"}
    smallest_train = min(len(train) for train, _ in splitter.split(features, targets))
    results = {}
    for name, estimator in probe_estimators(min(knn_k, smallest_train), seed).items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # the probe is still a probe at max_iter
            warnings.simplefilter("ignore", UserWarning)  # a class absent from a small test fold: F1 is defined
            scores = cross_validate(estimator, features, targets, cv=splitter, scoring=PROBE_SCORING)
        results[name] = {metric: summary(scores[f"test_{metric}"]) for metric in PROBE_SCORING}
    chance = classification_chance(targets, num_classes)
    return {
        "probes": results,
        "n_folds": splitter.get_n_splits(),
        "n": int(len(targets)),
        "knn_k": min(knn_k, smallest_train),
        "chance": {"accuracy": chance["top1"], "macro_f1": chance["macro_f1"]},
    }


def few_shot_probes(
    features: np.ndarray,
    targets: np.ndarray,
    classnames: list[str],
    shots: list[int],
    folds: int = 5,
    seed: int = 0,
) -> dict:
    """``{k: {"accuracy": {mean, std, folds}, "macro_f1": {...}}}`` or ``{k: {"skipped": reason}}``, per k."""
    splitter = fold_splitter(targets, folds, seed)
    out = {}
    for k in shots:
        if splitter is None:
            out[k] = {"skipped": "no stratified folds (a class with one sample, or a single class)"}
            continue
        per_fold = {"accuracy": [], "macro_f1": []}
        for fold, (train, test) in enumerate(splitter.split(features, targets)):
            fewest = int(np.bincount(targets[train], minlength=len(classnames)).min())
            if fewest < k:
                per_fold = None
                out[k] = {"skipped": f"a class has {fewest} < {k} training samples in fold {fold}"}
                break
            result = evaluate_linear_probe(
                (features[train], targets[train]),
                (features[test], targets[test]),
                classnames=classnames,
                k_shot=k,
                seed=seed + fold,
            )
            per_fold["accuracy"].append(result["top1"])
            per_fold["macro_f1"].append(result["macro_f1"])
        if per_fold is not None:
            out[k] = {metric: summary(values) for metric, values in per_fold.items()}
    return out


def format_mean_std(cell: dict | None) -> str:
    if not cell or cell.get("mean") is None or math.isnan(cell["mean"]):
        return "-"
    return f"{cell['mean']:.4f} ± {cell['std']:.4f}"
