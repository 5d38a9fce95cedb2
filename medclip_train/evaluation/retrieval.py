"""Image-text retrieval: R@K, mean and median rank both ways, in chunks of queries (never the N x N matrix).

Rank definition (0-based): the position of the best positive in a *stable* descending sort of the query's scores,

    rank = #{j : s_j > s*} + #{j < p* : s_j == s*},

where ``s*`` is the highest score among the query's positives and ``p*`` the lowest index of a positive with that
score. This is what open_clip's ``get_clip_metrics`` (``argsort``) and CLIP_benchmark's ``recall_at_k``
(``topk``) compute whenever their sort breaks ties by index, which PyTorch does on CPU for small inputs; for large
inputs their tie order is implementation-defined, while this one is exact and independent of the chunk size.
Breaking ties by index (instead of in the query's favour) also keeps a collapsed model, whose scores all tie,
at chance level instead of a perfect score.

For several captions per image (CLIP_benchmark's protocol): text-to-image has one positive per text; image-to-text
ranks the best of the image's captions. R@K = mean(rank < K); mean rank = mean(rank) + 1; median rank =
floor(median(rank)) + 1, as in ``get_clip_metrics``.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from medclip_train.evaluation.metrics import (
    BOOTSTRAP_MAX_N,
    BOOTSTRAP_SEED,
    bootstrap_settings,
    bootstrap_weights,
    percentile_interval,
)

DEFAULT_KS = (1, 5, 10)
SCORE_BUDGET = 1 << 25
"""Score elements per chunk when no chunk size is given: 32 M floats, 128 MiB."""


def retrieval_ranks(
    queries: torch.Tensor, candidates: torch.Tensor, positives: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """0-based rank of the best positive candidate of every query.

    Args:
        queries: (Q, D) features.
        candidates: (M, D) features.
        positives: (Q, P) candidate indices of each query's positives, padded with -1 (at least one per row).
        chunk_size: queries scored at once; memory is ``chunk_size x M`` scores. Default: 128 MiB of scores.

    Returns:
        (Q,) int64 ranks.
    """
    num_candidates = candidates.shape[0]
    if positives.dim() == 1:
        positives = positives.view(-1, 1)
    if (positives.max(dim=1).values < 0).any():
        raise ValueError("every query needs at least one positive candidate")
    chunk_size = chunk_size or max(1, SCORE_BUDGET // max(num_candidates, 1))
    positives = positives.to(candidates.device)
    # Score and mask buffers are allocated once and reused: a fresh ~33 MB mask per chunk sits just under glibc's
    # mmap threshold, lands on the heap and fragments it (RSS grew by ~2 GB over a 100k x 100k run).
    rows = min(chunk_size, queries.shape[0])
    scores = torch.empty(rows, num_candidates, dtype=candidates.dtype, device=candidates.device)
    mask = torch.empty(rows, num_candidates, dtype=torch.bool, device=candidates.device)
    ranks = []
    for start in range(0, queries.shape[0], chunk_size):
        chunk = queries[start : start + chunk_size].to(candidates)
        c = len(chunk)
        torch.matmul(chunk, candidates.T, out=scores[:c])  # (c, M)
        ranks.append(_chunk_ranks(scores[:c], mask[:c], positives[start : start + chunk_size]))
    return torch.cat(ranks) if ranks else torch.empty(0, dtype=torch.int64)


def _chunk_ranks(scores: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Ranks from a chunk's (c, M) scores; ``mask`` is a (c, M) bool work buffer, ``pos`` (c, P) the positives."""
    num_candidates = scores.shape[1]
    pos_scores = scores.gather(1, pos.clamp(min=0)).masked_fill(pos < 0, -torch.inf)
    best = pos_scores.max(dim=1, keepdim=True).values  # (c, 1) s*
    # lowest index among the positives that reach s* (padding and lower-scoring positives excluded)
    first = torch.where(pos_scores == best, pos, num_candidates).min(dim=1, keepdim=True).values
    rank = count_true(torch.gt(scores, best, out=mask))
    # Ties with s* other than p* itself are rare with real features: count them by index only in those rows.
    tied = (count_true(torch.eq(scores, best, out=mask)) > 1).nonzero().squeeze(1)
    if len(tied):
        column = torch.arange(num_candidates, device=scores.device)
        rank[tied] += count_true((scores[tied] == best[tied]) & (column < first[tied]))
    return rank.cpu()


def count_true(mask: torch.Tensor, block: int = 255) -> torch.Tensor:
    """(R,) int64 count of ``True`` per row of an (R, M) bool mask, without an (R, M) int64 temporary.

    ``mask.sum(dim=1)`` upcasts to int64 first, materialising 8 bytes per score (twice the score chunk itself);
    summing blocks of 255 as uint8 cannot overflow and needs no copy, only the (R, M / 255) partial sums are widened.
    """
    rows, width = mask.shape
    full = width - width % block
    counts = mask[:, full:].sum(dim=1)
    if full:
        partial = mask[:, :full].view(torch.uint8).view(rows, full // block, block).sum(dim=2, dtype=torch.uint8)
        counts += partial.sum(dim=1)
    return counts


def rank_metrics(ranks: torch.Tensor, ks=DEFAULT_KS, prefix: str = "") -> dict[str, float]:
    """``R@K`` for each K, ``mean_rank`` and ``median_rank`` of 0-based ranks (open_clip's definitions)."""
    preds = ranks.numpy()
    out = {f"{prefix}R@{k}": float(np.mean(preds < k)) for k in ks}
    out[f"{prefix}mean_rank"] = float(preds.mean() + 1)
    out[f"{prefix}median_rank"] = float(np.floor(np.median(preds)) + 1)
    return out


def captions_of_images(text_to_image: torch.Tensor, num_images: int) -> torch.Tensor:
    """(num_images, P) text indices of each image's captions, padded with -1."""
    counts = torch.bincount(text_to_image, minlength=num_images)
    if (counts == 0).any():
        raise ValueError(f"{int((counts == 0).sum())} images have no caption")
    order = torch.argsort(text_to_image, stable=True)
    table = torch.full((num_images, int(counts.max())), -1, dtype=torch.int64)
    slot = torch.arange(len(order)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    table[text_to_image[order], slot] = order
    return table


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor | None = None,
    chunk_size: int | None = None,
    ks=DEFAULT_KS,
    bootstrap: int = 0,
    seed: int = BOOTSTRAP_SEED,
) -> dict:
    """Image-to-text (``i2t_``) and text-to-image (``t2i_``) R@K, mean and median rank.

    Args:
        image_features: (N, D) normalised image features.
        text_features: (T, D) normalised text features.
        text_to_image: (T,) image index of each text; default ``arange(N)`` (one caption per image).
        chunk_size: queries per chunk (see :func:`retrieval_ranks`).
        bootstrap: resamples of the queries for 95% intervals of R@K (0: none; none above ``BOOTSTRAP_MAX_N``
            images). The candidates stay fixed: the interval is that of the queries' sampling.

    Returns:
        The metrics, ``num_images``, ``num_texts``, ``chance`` (:func:`retrieval_chance`) and, with ``bootstrap``,
        ``ci95`` (``[low, high]`` per R@K) and ``bootstrap`` (its settings).
    """
    if text_to_image is None:
        text_to_image = torch.arange(len(image_features))
    text_to_image = torch.as_tensor(text_to_image, dtype=torch.int64)
    i2t = retrieval_ranks(
        image_features, text_features, captions_of_images(text_to_image, len(image_features)), chunk_size
    )
    t2i = retrieval_ranks(text_features, image_features, text_to_image.view(-1, 1), chunk_size)
    metrics = {**rank_metrics(i2t, ks, "i2t_"), **rank_metrics(t2i, ks, "t2i_")}
    metrics.update(num_images=len(image_features), num_texts=len(text_features))
    metrics["chance"] = retrieval_chance(torch.bincount(text_to_image, minlength=len(image_features)).numpy(), ks)
    if bootstrap and 0 < len(image_features) <= BOOTSTRAP_MAX_N:
        metrics["ci95"] = {}
        for direction, ranks in (("i2t", i2t), ("t2i", t2i)):
            weights = bootstrap_weights(len(ranks), bootstrap, seed)
            for k in ks:
                hits = (ranks.numpy() < k).astype(np.float64)
                metrics["ci95"][f"{direction}_R@{k}"] = percentile_interval(weights @ hits / len(ranks))
        metrics["bootstrap"] = bootstrap_settings(bootstrap, seed)
    return metrics


def retrieval_chance(captions_per_image: np.ndarray, ks=DEFAULT_KS) -> dict[str, float]:
    """R@K and mean rank of a random ranking (what a model that ignores its input scores).

    Text to image, one positive among N images: R@K = min(K, N) / N, mean rank (N + 1) / 2. Image to text, an
    image with m of the T captions: R@K = 1 - C(T - m, K) / C(T, K) (some caption among the first K), mean rank of
    its best caption (T + 1) / (m + 1); averaged over the images. With one caption per image both are K / N.
    """
    m = np.asarray(captions_per_image, dtype=np.int64)
    num_images, num_texts = len(m), int(m.sum())
    chance = {}
    for k in ks:
        # C(T - m, K) / C(T, K) = prod_{j<K} (T - m - j) / (T - j), zero once a factor is (K > T - m).
        j = np.arange(min(k, num_texts))
        miss = np.prod(np.clip(num_texts - m[:, None] - j, 0, None) / (num_texts - j), axis=1)
        chance[f"i2t_R@{k}"] = float(np.mean(1 - miss))
        chance[f"t2i_R@{k}"] = min(k, num_images) / num_images
    chance["i2t_mean_rank"] = float(np.mean((num_texts + 1) / (m + 1)))
    chance["t2i_mean_rank"] = (num_images + 1) / 2
    return chance


def roco_subset(
    keys: list[str], captions: list[str], size: int = 2000, seed: int = 42, min_words: int = 3
) -> list[int]:
    """Indices of the ROCO-protocol test subset: ``size`` pairs among those whose caption has ``min_words`` words.

    The choice is by ``sha256(f"{seed}:{key}")``: the ``size`` eligible pairs with the smallest hashes, returned in
    input order. It depends only on the keys, the seed and the captions, not on reading order, library versions
    or the random generator of the day, so everyone gets the same ids.
    """
    eligible = [i for i, caption in enumerate(captions) if len(caption.split()) >= min_words]
    ranked = sorted(eligible, key=lambda i: hashlib.sha256(f"{seed}:{keys[i]}".encode()).hexdigest())
    return sorted(ranked[:size])


def evaluate_retrieval(
    encoder,
    source,
    max_samples: int | None = None,
    chunk_size: int | None = None,
    subset: int | None = None,
    subset_seed: int = 42,
    min_words: int = 3,
    bootstrap: int = 0,
) -> dict:
    """Encode the image-caption pairs of ``source`` and compute retrieval metrics.

    Args:
        encoder: a :class:`~medclip_train.evaluation.features.Encoder`.
        source: a shard source whose metas carry ``captions`` (see ``datasets.open_retrieval``).
        max_samples: encode only the first images (training's quick evaluation).
        subset: also report the ROCO-protocol subset of this many pairs (see :func:`roco_subset`).
        bootstrap: resamples for 95% intervals (see :func:`retrieval_metrics`).

    Returns:
        ``{"full": metrics, "subset": metrics | None, "subset_keys": [...], "skipped": images without caption}``.
    """
    encoded = encoder.images(source, max_samples=max_samples, desc="retrieval images")
    keep = [i for i, meta in enumerate(encoded.metas) if meta["captions"]]
    keys = [encoded.keys[i] for i in keep]
    captions = [encoded.metas[i]["captions"] for i in keep]
    if not keep:
        raise ValueError("retrieval: no image with a caption")
    image_features = encoded.features[torch.as_tensor(keep)]
    texts = [c for caps in captions for c in caps]
    text_to_image = torch.repeat_interleave(torch.arange(len(captions)), torch.tensor([len(c) for c in captions]))
    text_features = encoder.texts(texts, desc="retrieval texts")
    full = retrieval_metrics(image_features, text_features, text_to_image, chunk_size, bootstrap=bootstrap)
    result = {"full": full, "subset": None}
    result["skipped"] = len(encoded.keys) - len(keep)
    if subset:
        # An image is eligible when its first caption is long enough; of its captions, the long enough ones count.
        chosen = roco_subset(keys, [caps[0] for caps in captions], subset, subset_seed, min_words)
        chosen_set = set(chosen)
        text_ids = [
            t for t in range(len(texts)) if int(text_to_image[t]) in chosen_set and len(texts[t].split()) >= min_words
        ]
        remap = {image: row for row, image in enumerate(chosen)}
        sub_t2i = torch.tensor([remap[int(text_to_image[t])] for t in text_ids], dtype=torch.int64)
        result["subset"] = retrieval_metrics(
            image_features[chosen], text_features[text_ids], sub_t2i, chunk_size, bootstrap=bootstrap
        )
        result["subset"].update(size=subset, seed=subset_seed, min_words=min_words)
        result["subset_keys"] = [keys[i] for i in chosen]
    return result
