"""Feature analysis: silhouette and kNN purity against independent figures, and the maps as real PNGs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import silhouette_score

from medclip_train.evaluation.feature_maps import analyse_dataset, feature_metrics, knn_purity, purity_chance


def unit(angles_deg) -> np.ndarray:
    """Points on the unit circle: cosine distance is a function of the angle between them only."""
    a = np.radians(np.asarray(angles_deg, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], axis=1)


def clusters(seed: int = 0, per_class: int = 12, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Three tight clusters around orthogonal directions; 11 same-class neighbours each, more than k = 10."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:3] * 10
    features = np.concatenate([c + rng.normal(0, 0.1, (per_class, dim)) for c in centres])
    return features, np.repeat(np.arange(3), per_class)


def test_knn_purity_hand_computed():
    # Angles 0, 10, 25, 90 (classes 0 0 1 1). k=1: 0->10 same, 10->0 same, 25->10 other, 90->25 same: 3/4.
    # k=2: 0->{10,25} 1/2, 10->{0,25} 1/2, 25->{10,0} 0, 90->{25,10} 1/2: 1.5/4.
    features, targets = unit([0, 10, 25, 90]), np.array([0, 0, 1, 1])
    assert knn_purity(features, targets, k=1) == {"value": 0.75, "k": 1}
    assert knn_purity(features, targets, k=2) == {"value": 0.375, "k": 2}
    assert knn_purity(features, targets, k=10)["k"] == 3  # lowered to N - 1: every other sample


def test_well_separated_clusters_are_pure_and_chance_is_the_sum_of_squared_shares():
    features, targets = clusters()
    assert knn_purity(features, targets)["value"] == 1.0
    assert purity_chance(np.array([0, 0, 0, 1])) == pytest.approx(0.75**2 + 0.25**2)


def test_k_is_lowered_below_the_smallest_class_so_separated_classes_score_one():
    features, targets = clusters(per_class=6)  # k = 10 would cap purity at 5/10 = chance
    metrics = feature_metrics(features, targets)
    assert (metrics["knn_purity"], metrics["knn_purity_k"]) == (1.0, 5)


def test_silhouette_is_scikit_learns_cosine_silhouette():
    rng = np.random.default_rng(1)
    features, targets = rng.normal(size=(30, 8)), rng.integers(0, 3, 30)
    metrics = feature_metrics(features, targets)
    assert metrics["silhouette"] == pytest.approx(silhouette_score(features, targets, metric="cosine"), abs=1e-12)
    assert metrics["chance"]["knn_purity"] == pytest.approx(float(((np.bincount(targets) / 30) ** 2).sum()))
    assert feature_metrics(features, np.zeros(30, dtype=int))["silhouette"] is None  # one class: undefined


def test_the_map_is_a_png_of_sane_size(tmp_path):
    features, targets = clusters()
    out = analyse_dataset(features, targets, ["brain", "lymph", "lung"], "model_1 on organs", "map_m_o", tmp_path)
    assert out["plots"] == ["map_m_o_tsne.png"] and out["knn_purity"] == 1.0
    with Image.open(tmp_path / "map_m_o_tsne.png") as image:
        assert image.format == "PNG" and 300 <= image.width <= 2000 and 300 <= image.height <= 2000
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10  # drawn, not a blank canvas
