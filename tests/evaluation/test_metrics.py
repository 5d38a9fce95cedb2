"""Classification metrics against scikit-learn and CLIP_benchmark, and one example by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from clip_benchmark.metrics.zeroshot_classification import average_precision_per_class
from sklearn.metrics import average_precision_score, balanced_accuracy_score, f1_score, roc_auc_score

from medclip_train.evaluation.metrics import classification_metrics, multilabel_metrics, softmax_probabilities


def clip_benchmark_accuracy(output, target, topk=(1,)):
    """CLIP_benchmark 1.6.2's ``accuracy`` verbatim but for ``.item()``: its ``float()`` of a (1,) array fails
    under NumPy 2."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).item() / n for k in topk]


def test_hand_computed_example():
    # targets 0 0 1 1 2 2, predictions 0 1 1 1 2 0
    logits = torch.tensor([[3.0, 1, 0], [1, 3, 0], [0, 3, 1], [1, 2, 0], [0, 1, 2], [2, 0, 1]])
    targets = np.array([0, 0, 1, 1, 2, 2])
    m = classification_metrics(logits, targets)
    assert m["top1"] == pytest.approx(4 / 6)
    # recalls: class 0 1/2, class 1 2/2, class 2 1/2 -> mean 2/3
    assert m["balanced_acc"] == pytest.approx(2 / 3)
    # precisions: 0: 1/2, 1: 2/3, 2: 1/1; F1 = 2PR/(P+R): 0.5, 0.8, 2/3
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert "top5" not in m and m["num_classes"] == 3
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert [row["support"] for row in m["per_class"]] == [2, 2, 2]


def test_single_label_matches_sklearn_and_clip_benchmark():
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(200, 7)), dtype=torch.float32)
    targets = rng.integers(0, 7, 200)
    logits[np.arange(200), targets] += 1.0  # better than chance
    m = classification_metrics(logits, targets)
    pred = logits.argmax(1).numpy()
    acc1, acc5 = clip_benchmark_accuracy(logits, torch.tensor(targets), topk=(1, 5))
    assert m["top1"] == pytest.approx(acc1) and m["top5"] == pytest.approx(acc5)
    assert m["balanced_acc"] == pytest.approx(balanced_accuracy_score(targets, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(targets, pred, average="macro"))
    probs = softmax_probabilities(logits)
    assert m["auroc"] == pytest.approx(roc_auc_score(targets, probs, multi_class="ovr", average="macro"))


def test_binary_auroc_is_sklearns():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(100, 2))
    targets = (logits[:, 1] - logits[:, 0] + rng.normal(size=100) > 0).astype(int)
    m = classification_metrics(logits, targets)
    assert m["auroc"] == pytest.approx(roc_auc_score(targets, logits[:, 1] - logits[:, 0]))
    assert m["per_class"][0]["auroc"] == pytest.approx(m["auroc"])


def test_auroc_skips_a_class_absent_from_the_targets():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(60, 4))
    targets = rng.integers(0, 3, 60)  # class 3 never occurs: sklearn's ovr raises, we average over 0..2
    m = classification_metrics(logits, targets)
    probs = softmax_probabilities(logits)
    expected = np.mean([roc_auc_score(targets == c, probs[:, c]) for c in range(3)])
    assert m["auroc"] == pytest.approx(expected)
    assert np.isnan(m["per_class"][3]["auroc"])


def test_multilabel_map_matches_clip_benchmark_and_sklearn():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(80, 5))
    targets = (rng.random((80, 5)) < 0.3).astype(int)
    targets[:, 4] = 0  # a class without positives counts as AP 0 in both references
    m = multilabel_metrics(scores, targets)
    ref = average_precision_per_class(torch.tensor(scores), torch.tensor(targets))
    assert m["mAP"] == pytest.approx(ref.mean().item(), abs=1e-6)
    assert [row["ap"] for row in m["per_class"]] == pytest.approx(ref.tolist(), abs=1e-6)
    assert m["auroc"] == pytest.approx(np.mean([roc_auc_score(targets[:, c], scores[:, c]) for c in range(4)]))


# ------------------------------------------------------------------------------------------ chance and bootstrap


def test_chance_levels_by_hand():
    # 3 classes with shares 1/2, 1/6, 1/3
    m = classification_metrics(np.zeros((6, 3)), np.array([0, 0, 0, 1, 2, 2]))
    chance = m["chance"]
    assert chance["top1"] == pytest.approx(3 / 6)  # always "class 0"
    assert chance["balanced_acc"] == pytest.approx(1 / 3)
    assert chance["auroc"] == 0.5 and "top5" not in chance
    # uniform guess: F1_c = 2 p_c (1/3) / (p_c + 1/3): 0.4, 2/9, 1/3
    assert chance["macro_f1"] == pytest.approx((0.4 + 2 / 9 + 1 / 3) / 3)
    assert [row["prevalence"] for row in m["per_class"]] == pytest.approx([1 / 2, 1 / 6, 1 / 3])
    # 6 classes with counts 5 4 3 2 1 1: the 5 most frequent cover 15 of 16
    six = classification_metrics(np.zeros((16, 6)), np.repeat(np.arange(6), [5, 4, 3, 2, 1, 1]))
    assert six["chance"]["top5"] == pytest.approx(15 / 16) and six["chance"]["top1"] == pytest.approx(5 / 16)
    assert six["chance"]["balanced_acc"] == pytest.approx(1 / 6)


def test_a_model_that_ignores_the_image_scores_its_chance_level():
    rng = np.random.default_rng(7)
    targets = rng.choice(4, size=4000, p=[0.55, 0.25, 0.15, 0.05])
    majority = np.tile([1.0, 0, 0, 0], (4000, 1))  # always the majority class
    m = classification_metrics(majority, targets)
    assert m["top1"] == pytest.approx(m["chance"]["top1"]) and m["balanced_acc"] == pytest.approx(0.25)
    guess = rng.normal(size=(4000, 4))  # a random guess
    m = classification_metrics(guess, targets)
    for key in ("balanced_acc", "macro_f1", "auroc"):
        assert m[key] == pytest.approx(m["chance"][key], abs=0.03), key


def test_multilabel_chance_is_the_mean_prevalence():
    targets = np.array([[1, 0], [1, 1], [0, 0], [1, 0]])  # prevalences 3/4 and 1/4
    m = multilabel_metrics(np.zeros((4, 2)), targets)
    assert m["chance"] == {"mAP": pytest.approx(0.5), "auroc": 0.5}


def _resampled(weights_row: np.ndarray) -> np.ndarray:
    """The sample indices one row of bootstrap weights stands for."""
    return np.repeat(np.arange(len(weights_row)), weights_row.astype(int))


def test_bootstrap_intervals_equal_sklearn_on_the_resampled_sets():
    from medclip_train.evaluation.metrics import bootstrap_weights, percentile_interval

    rng = np.random.default_rng(8)
    for num_classes in (2, 6):
        targets = rng.integers(0, num_classes, 60)
        logits = rng.normal(size=(60, num_classes))
        logits[np.arange(60), targets] += 1.0
        m = classification_metrics(logits, targets, bootstrap=40, seed=3)
        weights = bootstrap_weights(60, 40, seed=3)
        assert (weights.sum(axis=1) == 60).all()
        probs = softmax_probabilities(logits)
        ref = {"top1": [], "balanced_acc": [], "macro_f1": [], "auroc": []}
        for row in weights:
            idx = _resampled(row)
            y, pred = targets[idx], logits[idx].argmax(1)
            ref["top1"].append(np.mean(y == pred))
            ref["balanced_acc"].append(balanced_accuracy_score(y, pred))
            ref["macro_f1"].append(f1_score(y, pred, average="macro"))
            if num_classes == 2:
                ref["auroc"].append(roc_auc_score(y, probs[idx, 1]))
            else:
                present = [c for c in range(num_classes) if 0 < (y == c).sum() < len(y)]
                ref["auroc"].append(np.mean([roc_auc_score(y == c, probs[idx, c]) for c in present]))
        for key, values in ref.items():
            assert m["ci95"][key] == pytest.approx(percentile_interval(values), abs=1e-12), (num_classes, key)


def test_multilabel_bootstrap_equals_sklearn_on_the_resampled_sets():
    from medclip_train.evaluation.metrics import bootstrap_weights, percentile_interval

    rng = np.random.default_rng(9)
    scores = np.round(rng.normal(size=(50, 3)), 1)  # rounded: ties, which AP and AUROC must break as sklearn does
    targets = (rng.random((50, 3)) < 0.4).astype(int)
    m = multilabel_metrics(scores, targets, bootstrap=30, seed=1)
    ref_map, ref_auroc = [], []
    for row in bootstrap_weights(50, 30, seed=1):
        idx = _resampled(row)
        t, s = targets[idx], scores[idx]
        ref_map.append(np.mean([average_precision_score(t[:, c], s[:, c]) if t[:, c].any() else 0 for c in range(3)]))
        ref_auroc.append(np.mean([roc_auc_score(t[:, c], s[:, c]) for c in range(3) if 0 < t[:, c].sum() < len(t)]))
    assert m["ci95"]["mAP"] == pytest.approx(percentile_interval(ref_map), abs=1e-12)
    assert m["ci95"]["auroc"] == pytest.approx(percentile_interval(ref_auroc), abs=1e-12)


def _noisy_classifier(n: int, seed: int):
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), targets] += 0.8
    return logits, targets


def test_bootstrap_interval_holds_the_estimate_and_shrinks_as_n_grows():
    widths = {}
    for n in (100, 400, 3000):
        m = classification_metrics(*_noisy_classifier(n, seed=n), bootstrap=1000)
        assert m["bootstrap"] == {"resamples": 1000, "seed": 0, "level": 0.95, "method": "percentile"}
        for key in ("top1", "balanced_acc", "macro_f1", "auroc"):
            low, high = m["ci95"][key]
            assert low <= m[key] <= high, (n, key)
        widths[n] = {key: high - low for key, (low, high) in m["ci95"].items()}
    for key in widths[100]:
        assert widths[100][key] > widths[400][key] > widths[3000][key], key
    # 1/sqrt(n): a 30 times larger test set gives an interval about 5.5 times narrower
    assert 3.5 < widths[100]["top1"] / widths[3000]["top1"] < 8


def test_bootstrap_is_reproducible_and_skipped_for_large_test_sets():
    from medclip_train.evaluation.metrics import BOOTSTRAP_MAX_N

    logits, targets = _noisy_classifier(200, seed=1)
    assert (
        classification_metrics(logits, targets, bootstrap=200)["ci95"]
        == classification_metrics(logits, targets, bootstrap=200)["ci95"]
    )
    assert "ci95" not in classification_metrics(logits, targets)  # off unless asked for (training's in-loop eval)
    big = classification_metrics(*_noisy_classifier(BOOTSTRAP_MAX_N + 1, seed=2), bootstrap=10)
    assert "ci95" not in big and "chance" in big
