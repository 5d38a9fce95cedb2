"""Linear probe: the C sweep, k-shot selection and metrics."""

from __future__ import annotations

import numpy as np
import pytest

from medclip_train.evaluation.errors import EvalInputError
from medclip_train.evaluation.linear_probe import C_GRID, evaluate_linear_probe, k_shot_indices, sweep_c


def blobs(n_per_class: int, classes: int = 3, dim: int = 16, seed: int = 0, spread: float = 1.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * 2
    y = np.repeat(np.arange(classes), n_per_class)
    x = centres[y] + spread * rng.normal(size=(len(y), dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True), y


def test_probe_separates_blobs_and_reports_classification_metrics():
    train, test = blobs(40, seed=0), blobs(20, seed=0)
    result = evaluate_linear_probe(train, (test[0][::-1].copy(), test[1][::-1].copy()), classnames=["a", "b", "c"])
    assert result["top1"] > 0.9 and result["balanced_acc"] > 0.9 and result["auroc"] > 0.95
    assert result["C"] in C_GRID and result["n_train"] == 120 and result["n_val"] == 24
    assert [row["class"] for row in result["per_class"]] == ["a", "b", "c"]


def test_sweep_is_coarse_to_fine_over_the_grid():
    x, y = blobs(30, seed=1, spread=3.0)
    best, tried = sweep_c(x[::2], y[::2], x[1::2], y[1::2])
    assert best in tried and len(tried) <= 7 + 3 * 4
    assert {float(C_GRID[i]) for i in range(0, 97, 16)} <= set(tried)  # the 7 starting points


def test_k_shot_takes_k_per_class_and_is_seeded():
    y = np.repeat(np.arange(4), 10)
    chosen = k_shot_indices(y, 3, seed=5)
    assert np.bincount(y[chosen]).tolist() == [3, 3, 3, 3]
    assert np.array_equal(chosen, k_shot_indices(y, 3, seed=5))
    with pytest.raises(EvalInputError, match="only 10"):
        k_shot_indices(y, 11)
    result = evaluate_linear_probe(blobs(20), blobs(10, seed=3), k_shot=2)
    assert result["n_train"] == 6 and result["k_shot"] == 2 and result["n_val"] == 54
