"""Classification metrics against scikit-learn and CLIP_benchmark, and one example by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from clip_benchmark.metrics.zeroshot_classification import average_precision_per_class
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

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
