"""Linear probe: L2-regularised logistic regression on frozen image features (scikit-learn, L-BFGS).

The regularisation is chosen on a validation split as in the CLIP paper (Radford et al. 2021, appendix A.3): a
sweep over 97 log-spaced values between 1e-6 and 1e6 (8 per decade), searched coarse-to-fine from the 7 values
1e-6, 1e-4, ..., 1e6 by halving the interval around the peak, the same search CLIP_benchmark's ``find_peak`` runs
over its weight decays. Here the swept value is scikit-learn's ``C`` (inverse regularisation strength).
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from medclip_train.evaluation.errors import EvalInputError
from medclip_train.evaluation.metrics import classification_metrics

C_GRID = np.logspace(-6, 6, 97)
COARSE_STEP = 16
"""Every 16th grid value (two decades): the 7 starting points of the search."""


def fit_logistic_regression(x: np.ndarray, y: np.ndarray, c: float, seed: int = 0, max_iter: int = 1000):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # tiny C or k-shot data: the probe is still usable
        return LogisticRegression(C=c, max_iter=max_iter, random_state=seed).fit(x, y)


def sweep_c(
    train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, seed: int = 0, max_iter: int = 1000
) -> tuple[float, dict[float, float]]:
    """Best ``C`` by validation accuracy with the coarse-to-fine search; returns it and every (C, accuracy) tried."""
    tried: dict[int, float] = {}

    def accuracy(index: int) -> float:
        if index not in tried:
            clf = fit_logistic_regression(train_x, train_y, float(C_GRID[index]), seed, max_iter)
            tried[index] = float((clf.predict(val_x) == val_y).mean())
        return tried[index]

    def peak(indices) -> int:
        best, best_acc = indices[0], -1.0
        for index in indices:  # strict '>' keeps the first (strongest regularisation) of equal accuracies
            if accuracy(index) > best_acc:
                best, best_acc = index, accuracy(index)
        return best

    best = peak(list(range(0, len(C_GRID), COARSE_STEP)))
    span = COARSE_STEP // 2
    while span > 0:
        best = peak([max(best - span, 0), best, min(best + span, len(C_GRID) - 1)])
        span //= 2
    return float(C_GRID[best]), {float(C_GRID[i]): acc for i, acc in sorted(tried.items())}


def k_shot_indices(targets: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """``k`` samples per class, drawn with a seeded permutation (as CLIP_benchmark's few-shot selection)."""
    order = np.random.default_rng(seed).permutation(len(targets))
    chosen = []
    for c in np.unique(targets):
        of_class = order[targets[order] == c][:k]
        if len(of_class) < k:
            raise EvalInputError(f"--k-shot {k}: class {c} has only {len(of_class)} training samples")
        chosen.append(of_class)
    return np.sort(np.concatenate(chosen))


def split_validation(targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices, stratified when every class has at least two samples."""
    indices = np.arange(len(targets))
    _, counts = np.unique(targets, return_counts=True)
    stratify = targets if counts.min() >= 2 else None
    n_val = max(int(round(fraction * len(targets))), len(counts) if stratify is not None else 1)
    if len(targets) - n_val < 1:
        return indices, indices[:0]
    train, val = train_test_split(indices, test_size=n_val, random_state=seed, stratify=stratify)
    return np.sort(train), np.sort(val)


def evaluate_linear_probe(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray] | None = None,
    classnames: list[str] | None = None,
    k_shot: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
) -> dict:
    """Fit the probe on ``train`` (features, class indices), choose ``C`` on ``val``, report metrics on ``test``.

    Without ``val``, a stratified ``val_fraction`` of ``train`` is held out (with ``k_shot``: taken from the
    training samples not drawn). With all training data, the final probe is refit on train + val with the chosen
    ``C``; with ``k_shot``, on the k-shot set only (CLIP_benchmark's rule), so it never sees more than k per class.

    Returns:
        The metrics of :func:`classification_metrics` plus ``C``, ``sweep``, ``k_shot``, ``n_train``, ``n_val``.
    """
    train_x, train_y = (np.asarray(a) for a in train)
    test_x, test_y = (np.asarray(a) for a in test)
    num_classes = len(classnames) if classnames else int(max(train_y.max(), test_y.max()) + 1)
    if val is None:
        if k_shot:
            chosen = k_shot_indices(train_y, k_shot, seed)
            rest = np.setdiff1d(np.arange(len(train_y)), chosen)
            val_x, val_y = train_x[rest], train_y[rest]
            train_x, train_y = train_x[chosen], train_y[chosen]
        else:
            fit_idx, val_idx = split_validation(train_y, val_fraction, seed)
            val_x, val_y = train_x[val_idx], train_y[val_idx]
            train_x, train_y = train_x[fit_idx], train_y[fit_idx]
    else:
        val_x, val_y = (np.asarray(a) for a in val)
        if k_shot:
            chosen = k_shot_indices(train_y, k_shot, seed)
            train_x, train_y = train_x[chosen], train_y[chosen]
    if len(np.unique(train_y)) < 2:
        raise EvalInputError("linear probe: the training split has fewer than two classes")
    if len(val_y):
        best_c, sweep = sweep_c(train_x, train_y, val_x, val_y, seed, max_iter)
    else:
        best_c, sweep = 1.0, {}  # no validation data: scikit-learn's default
    if not k_shot and len(val_y):
        final_x, final_y = np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y])
    else:
        final_x, final_y = train_x, train_y
    clf = fit_logistic_regression(final_x, final_y, best_c, seed, max_iter)
    logits = np.full((len(test_y), num_classes), -1e9)  # a class absent from training can never be predicted
    logits[:, clf.classes_] = clf.predict_log_proba(test_x)
    result = classification_metrics(logits, test_y, classnames)
    result.update(
        C=best_c,
        sweep={f"{c:.3g}": acc for c, acc in sweep.items()},
        k_shot=k_shot,
        n_train=int(len(final_y)),
        n_val=int(len(val_y)),
    )
    return result
