"""Retrieval metrics against CLIP_benchmark and open_clip, chunked against full-matrix, and the ROCO subset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k

from medclip_train.evaluation.retrieval import count_true, retrieval_metrics, retrieval_ranks, roco_subset

try:
    from open_clip_train.train import get_clip_metrics
except ImportError:  # open_clip_train is optional; this is its definition (open_clip src/open_clip_train/train.py)

    def get_clip_metrics(image_features, text_features, logit_scale):
        metrics = {}
        logits_per_image = (logit_scale * image_features @ text_features.t()).detach().cpu()
        logits = {"image_to_text": logits_per_image, "text_to_image": logits_per_image.t().detach().cpu()}
        ground_truth = torch.arange(len(text_features)).view(-1, 1)
        for name, logit in logits.items():
            ranking = torch.argsort(logit, descending=True)
            preds = torch.where(ranking == ground_truth)[1].detach().cpu().numpy()
            metrics[f"{name}_mean_rank"] = preds.mean() + 1
            metrics[f"{name}_median_rank"] = np.floor(np.median(preds)) + 1
            for k in [1, 5, 10]:
                metrics[f"{name}_R@{k}"] = np.mean(preds < k)
        return metrics


def random_features(n: int, dim: int = 32, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def clip_benchmark_recalls(images, texts, text_to_image, ks=(1, 5, 10)) -> dict[str, float]:
    """CLIP_benchmark's ``zeroshot_retrieval.evaluate`` from the embeddings on (its ``batchify`` is a no-op split)."""
    scores = texts @ images.t()
    positive_pairs = torch.zeros_like(scores, dtype=torch.bool)
    positive_pairs[torch.arange(len(scores)), text_to_image] = True
    out = {}
    for k in ks:
        out[f"t2i_R@{k}"] = (recall_at_k(scores, positive_pairs, k) > 0).float().mean().item()
        out[f"i2t_R@{k}"] = (recall_at_k(scores.T, positive_pairs.T, k) > 0).float().mean().item()
    return out


def test_one_caption_per_image_equals_open_clip_get_clip_metrics():
    images, texts = random_features(300, seed=1), random_features(300, seed=2)
    ours = retrieval_metrics(images, texts, chunk_size=64)
    ref = get_clip_metrics(images, texts, logit_scale=torch.tensor(100.0))
    for ours_dir, ref_dir in (("i2t", "image_to_text"), ("t2i", "text_to_image")):
        for k in (1, 5, 10):
            assert ours[f"{ours_dir}_R@{k}"] == pytest.approx(float(ref[f"{ref_dir}_R@{k}"]), abs=1e-12)
        assert ours[f"{ours_dir}_mean_rank"] == pytest.approx(float(ref[f"{ref_dir}_mean_rank"]), abs=1e-9)
        assert ours[f"{ours_dir}_median_rank"] == float(ref[f"{ref_dir}_median_rank"])


def test_several_captions_per_image_equals_clip_benchmark():
    # 40 images with 1 to 5 captions each, texts correlated with their image so recalls are not all ~0.
    images = random_features(40, seed=3)
    counts = torch.randint(1, 6, (40,), generator=torch.Generator().manual_seed(4))
    text_to_image = torch.repeat_interleave(torch.arange(40), counts)
    texts = F.normalize(images[text_to_image] + 3.0 * random_features(len(text_to_image), seed=5), dim=-1)
    ours = retrieval_metrics(images, texts, text_to_image, chunk_size=7)
    ref = clip_benchmark_recalls(images, texts, text_to_image)
    for name, value in ref.items():
        assert ours[name] == pytest.approx(value, abs=1e-7), name
    assert 0 < ours["i2t_R@1"] < 1 and 0 < ours["t2i_R@1"] < 1


def full_matrix_ranks(queries, candidates, positives) -> torch.Tensor:
    """Reference: rank of the best positive in a stable descending sort of the full score matrix."""
    order = torch.sort(queries @ candidates.T, dim=1, descending=True, stable=True).indices
    position = torch.empty_like(order)
    position.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
    pos = positives.clamp(min=0)
    return torch.where(positives >= 0, position.gather(1, pos), order.shape[1]).min(dim=1).values


def tied_features() -> tuple[torch.Tensor, torch.Tensor]:
    """Dyadic entries: every dot product is exact in float32 whatever the summation order, so ties are exact.

    Many vectors are duplicated, and texts copy images, so the score matrix is full of ties.
    """
    gen = torch.Generator().manual_seed(7)
    base = torch.randint(-2, 3, (6, 8), generator=gen).float() / 4
    images = base[torch.randint(0, 6, (50,), generator=gen)]
    texts = base[torch.randint(0, 6, (120,), generator=gen)]
    return images, texts


@pytest.mark.parametrize("chunk_size", [1, 3, 16, 50, 1000])
def test_chunked_ranks_equal_full_matrix_with_ties(chunk_size):
    images, texts = tied_features()
    text_to_image = torch.arange(120) % 50
    # t2i: one positive per text
    t2i = retrieval_ranks(texts, images, text_to_image.view(-1, 1), chunk_size)
    assert torch.equal(t2i, full_matrix_ranks(texts, images, text_to_image.view(-1, 1)))
    # i2t: the image's captions, padded with -1
    from medclip_train.evaluation.retrieval import captions_of_images

    captions = captions_of_images(text_to_image, 50)
    i2t = retrieval_ranks(images, texts, captions, chunk_size)
    assert torch.equal(i2t, full_matrix_ranks(images, texts, captions))
    assert torch.equal(i2t, retrieval_ranks(images, texts, captions, None))


def test_ties_broken_by_index_like_the_references_on_small_inputs():
    # Identical candidates: every score ties. A stable sort puts lower indices first, and so do open_clip's argsort
    # and CLIP_benchmark's topk on CPU for an input this small: query i's positive i is at position i.
    features = torch.ones(6, 4) / 2
    ranks = retrieval_ranks(features, features, torch.arange(6).view(-1, 1))
    assert ranks.tolist() == [0, 1, 2, 3, 4, 5]
    ref = get_clip_metrics(features, features, logit_scale=torch.tensor(1.0))
    ours = retrieval_metrics(features, features)
    assert ours["i2t_R@1"] == pytest.approx(float(ref["image_to_text_R@1"])) == pytest.approx(1 / 6)
    assert ours["t2i_mean_rank"] == pytest.approx(float(ref["text_to_image_mean_rank"])) == 3.5
    cb = clip_benchmark_recalls(features, features, torch.arange(6), ks=(1, 5))
    assert ours["t2i_R@1"] == pytest.approx(cb["t2i_R@1"]) and ours["i2t_R@5"] == pytest.approx(cb["i2t_R@5"])


def test_hand_computed_ranks():
    # query 0: positive score 0.5, one score above (0.9) and one tie before it (index 0) -> rank 2
    # query 1: positives {1, 3}; best positive 3 (0.8) with 0.9 above -> rank 1
    candidates = torch.eye(4)
    queries = torch.tensor([[0.5, 0.9, 0.5, 0.1], [0.2, 0.3, 0.9, 0.8]])
    positives = torch.tensor([[2, -1], [1, 3]])
    assert retrieval_ranks(queries, candidates, positives).tolist() == [2, 1]


def test_roco_subset_is_deterministic_and_respects_min_words():
    rng = np.random.default_rng(0)
    keys = [f"PMC{i:06d}_fig{i % 7}" for i in range(5000)]
    captions = [" ".join(["word"] * int(rng.integers(1, 8))) for _ in keys]
    first = roco_subset(keys, captions, 2000, seed=42, min_words=3)
    assert first == roco_subset(keys, captions, 2000, seed=42, min_words=3)
    assert len(first) == 2000 == len(set(first)) and first == sorted(first)
    assert all(len(captions[i].split()) >= 3 for i in first)
    # independent of reading order
    perm = rng.permutation(len(keys))
    shuffled = roco_subset([keys[i] for i in perm], [captions[i] for i in perm], 2000, seed=42, min_words=3)
    assert sorted(keys[perm[i]] for i in shuffled) == sorted(keys[i] for i in first)
    assert roco_subset(keys, captions, 2000, seed=43, min_words=3) != first
    # fewer eligible than asked: all of them
    assert len(roco_subset(keys[:10], ["a b c"] * 5 + ["a"] * 5, 2000)) == 5


@pytest.mark.parametrize("width", [1, 254, 255, 256, 1000, 5101])
def test_count_true_equals_sum(width):
    mask = torch.rand(7, width, generator=torch.Generator().manual_seed(width)) < 0.9
    assert torch.equal(count_true(mask), mask.sum(dim=1))
    assert torch.equal(count_true(mask[2:5]), mask[2:5].sum(dim=1))  # a row slice, as for the tied rows
    assert torch.equal(count_true(torch.ones(3, width, dtype=torch.bool)), torch.full((3,), width))


# ------------------------------------------------------------------------------------------ chance and bootstrap


def test_chance_levels_by_hand():
    from medclip_train.evaluation.retrieval import retrieval_chance

    # one caption per image: R@K = K / N
    chance = retrieval_chance(np.ones(10, dtype=int))
    assert [chance[f"i2t_R@{k}"] for k in (1, 5, 10)] == pytest.approx([0.1, 0.5, 1.0])
    assert [chance[f"t2i_R@{k}"] for k in (1, 5, 10)] == pytest.approx([0.1, 0.5, 1.0])
    assert chance["i2t_mean_rank"] == chance["t2i_mean_rank"] == pytest.approx(5.5)
    # 4 images with 1, 2, 1, 1 of T = 5 captions. i2t R@1: an image's best caption is first with chance m / T:
    # (1 + 2 + 1 + 1) / 5 / 4 = 0.25. R@2: 1 - C(5-m, 2) / C(5, 2) = 1 - 6/10 (m=1), 1 - 3/10 (m=2) -> 0.475.
    # Mean rank of the best of m among T: (T + 1) / (m + 1) = 3, 2, 3, 3. t2i: 1/4, 2/4, mean rank 2.5.
    chance = retrieval_chance(np.array([1, 2, 1, 1]), ks=(1, 2, 5))
    assert chance["i2t_R@1"] == pytest.approx(0.25) and chance["i2t_R@2"] == pytest.approx(0.475)
    assert chance["i2t_R@5"] == 1.0 and chance["i2t_mean_rank"] == pytest.approx(2.75)
    assert chance["t2i_R@1"] == pytest.approx(0.25) and chance["t2i_R@2"] == pytest.approx(0.5)
    assert chance["t2i_R@5"] == 1.0 and chance["t2i_mean_rank"] == pytest.approx(2.5)


def test_random_features_score_the_chance_level():
    images, texts = random_features(2000, seed=11), random_features(2000, seed=12)
    m = retrieval_metrics(images, texts)
    for key in ("i2t_R@10", "t2i_R@10"):
        assert m[key] == pytest.approx(m["chance"][key], abs=0.01)  # 0.005 expected, binomial sd 0.0016
    assert m["t2i_mean_rank"] == pytest.approx(m["chance"]["t2i_mean_rank"], rel=0.05)


def test_bootstrap_interval_holds_the_estimate_and_shrinks_as_n_grows():
    widths = []
    for n in (100, 1600):
        images = random_features(n, seed=n)
        texts = F.normalize(images + 3.0 * random_features(n, seed=n + 1), dim=-1)  # R@k between 0.04 and 0.75
        m = retrieval_metrics(images, texts, bootstrap=1000)
        for key, (low, high) in m["ci95"].items():
            assert low <= m[key] <= high, (n, key)
        widths.append({key: high - low for key, (low, high) in m["ci95"].items()})
        assert m["bootstrap"]["resamples"] == 1000
    for key in widths[0]:
        assert widths[0][key] > widths[1][key], key
    assert "ci95" not in retrieval_metrics(images, texts)
