"""Feature analysis of ``medclip-eval suite``: how well a model's image features separate the classes.

Two figures per model and dataset, both on cosine geometry (the features are L2-normalised, as zero-shot uses them):
scikit-learn's silhouette score (-1..1, chance about 0) and kNN purity, the share of each sample's k nearest
neighbours (itself left out) that have its class, whose chance level is the sum of squared class shares (the
neighbour's class drawn from the class shares). Plus 2-D maps (t-SNE; UMAP too where ``umap`` is installed) as PNG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import silhouette_score
from sklearn.neighbors import NearestNeighbors

PURITY_K = 10
MAP_MAX_POINTS = 3000
"""t-SNE is quadratic-ish in memory and time: a larger set is mapped on a seeded random subset of this size."""
SILHOUETTE_MAX_POINTS = 10000
"""silhouette_score builds the full distance matrix; sklearn's own ``sample_size`` (seeded) above this."""


def knn_purity(features: np.ndarray, targets: np.ndarray, k: int = PURITY_K) -> dict:
    """Mean share of same-class samples among each sample's ``k`` cosine nearest neighbours (``k`` lowered to N-1)."""
    n = len(targets)
    k = min(k, n - 1)
    if k < 1:
        return {"value": None, "k": 0}
    # k + 1 neighbours: the first is the sample itself (distance 0), which must not vote for its own class.
    neighbours = NearestNeighbors(n_neighbors=k + 1, metric="cosine").fit(features)
    _, index = neighbours.kneighbors(features)
    index = np.array([[j for j in row if j != i][:k] for i, row in enumerate(index)])  # self may tie at distance 0
    same = targets[index] == targets[:, None]
    return {"value": float(same.mean()), "k": int(k)}


def purity_chance(targets: np.ndarray) -> float:
    """Sum of squared class shares: the purity of neighbours drawn at random from the set."""
    share = np.bincount(targets) / max(len(targets), 1)
    return float((share**2).sum())


def silhouette(features: np.ndarray, targets: np.ndarray, seed: int = 0) -> float | None:
    """scikit-learn's cosine silhouette score; ``None`` when undefined (one class, or a class per sample)."""
    classes = len(np.unique(targets))
    if classes < 2 or classes >= len(targets):
        return None
    sample = SILHOUETTE_MAX_POINTS if len(targets) > SILHOUETTE_MAX_POINTS else None
    return float(silhouette_score(features, targets, metric="cosine", sample_size=sample, random_state=seed))


def feature_metrics(features: np.ndarray, targets: np.ndarray, seed: int = 0) -> dict:
    """``{"silhouette", "knn_purity", "knn_purity_k", "n", "chance"}`` for the suite's tables.

    k is lowered below the smallest class's size: with k = 10 and 6 images a class, even perfectly separated classes
    would score 5/10, which reads as chance.
    """
    smallest = int(np.bincount(targets)[np.bincount(targets) > 0].min()) if len(targets) else 1
    purity = knn_purity(features, targets, min(PURITY_K, max(1, smallest - 1)))
    return {
        "silhouette": silhouette(features, targets, seed),
        "knn_purity": purity["value"],
        "knn_purity_k": purity["k"],
        "n": int(len(targets)),
        "chance": {"silhouette": 0.0, "knn_purity": purity_chance(targets)},
    }


def subset_for_map(n: int, seed: int = 0, limit: int = MAP_MAX_POINTS) -> np.ndarray:
    """Indices mapped: all of them, or a seeded random ``limit`` of them (sorted)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


EXACT_TSNE_MAX_POINTS = 200


def embed_2d(features: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """(N, 2) coordinates: t-SNE (cosine, perplexity lowered for small sets) or UMAP (cosine)."""
    n = len(features)
    if n < 3:
        return np.zeros((n, 2))
    if method == "umap":
        import umap

        return umap.UMAP(n_neighbors=min(15, n - 1), metric="cosine", random_state=seed).fit_transform(features)
    from sklearn.manifold import TSNE

    perplexity = min(30.0, max(1.0, (n - 1) / 3))  # sklearn requires perplexity < n
    # Small sets: exact gradients, cheaper than Barnes-Hut's per-iteration tree and thread start-up there (45 points:
    # 0.35 s against 2.0 s on 2 cores) and no approximation; the map is only a picture, no figure reads it.
    method = "exact" if n <= EXACT_TSNE_MAX_POINTS else "barnes_hut"
    tsne = TSNE(n_components=2, metric="cosine", perplexity=perplexity, init="pca", random_state=seed, method=method)
    return tsne.fit_transform(features)


def map_methods() -> list[str]:
    """t-SNE always; UMAP only where the optional ``umap-learn`` package is installed."""
    try:
        import umap  # noqa: F401
    except ImportError:
        return ["tsne"]
    return ["tsne", "umap"]


MARKERS = "os^Dv<>Ph*X"


def save_map(path: Path, coords: np.ndarray, groups: np.ndarray, names: list[str], title: str, shapes=None) -> Path:
    """A scatter of ``coords`` coloured by ``groups`` (legend: ``names``); ``shapes`` (names per point) sets markers."""
    import matplotlib

    matplotlib.use("Agg")  # headless: evaluation runs on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    size = 28 if len(coords) <= 500 else 8
    shape_names = list(dict.fromkeys(shapes)) if shapes is not None else [None]
    for g, name in enumerate(names):
        for s, shape in enumerate(shape_names):
            mask = groups == g if shape is None else (groups == g) & (np.asarray(shapes) == shape)
            if mask.any():
                label = name if shape is None else f"{name} / {shape}"
                colour = colours(g % colours.N)
                ax.scatter(*coords[mask].T, s=size, color=colour, marker=MARKERS[s % len(MARKERS)], label=label)
    ax.set_title(title)
    ax.set_xticks([]), ax.set_yticks([])  # t-SNE axes have no units: only the neighbourhoods mean something
    legend_title = "class" if shapes is None else "modality / dataset"
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False, title=legend_title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def analyse_dataset(
    features: np.ndarray, targets: np.ndarray, names: list[str], title: str, stem: str, plots: Path, seed: int = 0
) -> dict:
    """Metrics of :func:`feature_metrics` plus one class-coloured map per method under ``plots`` (``stem_<m>.png``)."""
    out = feature_metrics(features, targets, seed)
    chosen = subset_for_map(len(targets), seed)
    out["plots"] = []
    for method in map_methods():
        coords = embed_2d(features[chosen], method, seed)
        subtitle = f"{title}\n{method_name(method)}, coloured by class, n={len(chosen)}"
        path = save_map(plots / f"{stem}_{method}.png", coords, targets[chosen], names, subtitle)
        out["plots"].append(path.name)
    return out


def analyse_modalities(parts: list[dict], title: str, stem: str, plots: Path, seed: int = 0) -> list[str]:
    """One map of a model's features over all its datasets, coloured by modality, a marker per dataset.

    Args:
        parts: per dataset ``{"dataset", "modality", "features"}`` (features already subset for the map).
    """
    features = np.concatenate([p["features"] for p in parts])
    modalities = list(dict.fromkeys(p["modality"] or "unknown" for p in parts))
    groups = np.concatenate([np.full(len(p["features"]), modalities.index(p["modality"] or "unknown")) for p in parts])
    shapes = np.concatenate([np.full(len(p["features"]), p["dataset"], dtype=object) for p in parts])
    names = []
    for method in map_methods():
        coords = embed_2d(features, method, seed)
        subtitle = f"{title}\n{method_name(method)}, coloured by modality, marker by dataset, n={len(features)}"
        names.append(save_map(plots / f"{stem}_{method}.png", coords, groups, modalities, subtitle, shapes).name)
    return names


def method_name(method: str) -> str:
    return {"tsne": "t-SNE (cosine)", "umap": "UMAP (cosine)"}[method]
