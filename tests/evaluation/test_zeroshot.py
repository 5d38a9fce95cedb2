"""Zero-shot classifier and accuracy against open_clip's and CLIP_benchmark's own functions, same model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from clip_benchmark.metrics import zeroshot_classification as cb
from open_clip.zero_shot_classifier import build_zero_shot_classifier
from torch.utils.data import DataLoader

from medclip_train.evaluation.datasets import open_classification
from medclip_train.evaluation.features import Encoder
from medclip_train.evaluation.prompts import PromptSet
from medclip_train.evaluation.zeroshot import evaluate_zeroshot, zero_shot_classifier

CLASSNAMES = ["pneumonia", "melanoma", "a normal chest", "lymph node tissue", "the brain", "an ultrasound"]
TEMPLATES = ["a photo of {c}.", "a chest x-ray showing {c}", "histopathology image of {c}"]


def test_classifier_equals_open_clip_build_zero_shot_classifier(tiny_clip):
    prompts = PromptSet(classes=CLASSNAMES, classnames=CLASSNAMES, templates=TEMPLATES)
    ours = zero_shot_classifier(tiny_clip.model, tiny_clip.tokenizer, prompts)
    ref = build_zero_shot_classifier(
        tiny_clip.model, tiny_clip.tokenizer, CLASSNAMES, [t.replace("{c}", "{}") for t in TEMPLATES]
    )
    assert ours.shape == (128, len(CLASSNAMES))
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_class_prompts_equal_clip_benchmark_dict_prompts(tiny_clip):
    class_prompts = {
        "a": ["a chest x-ray showing pneumonia", "pneumonia"],
        "b": ["skin lesion consistent with melanoma"],
    }
    prompts = PromptSet(
        classes=["a", "b", "c"],
        classnames=["x", "y", "the brain"],
        templates=["an MRI of {c}"],
        class_prompts=class_prompts,
    )
    ours = zero_shot_classifier(tiny_clip.model, tiny_clip.tokenizer, prompts)
    ref = cb.zero_shot_classifier(
        tiny_clip.model,
        tiny_clip.tokenizer,
        ["a", "b", "c"],
        {**class_prompts, "c": ["an MRI of the brain"]},
        "cpu",
        amp=False,
    )
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_accuracy_equals_clip_benchmark_evaluate(tiny_clip, tmp_path, monkeypatch):
    from tests.evaluation.conftest import write_image_folder
    from tests.evaluation.test_metrics import clip_benchmark_accuracy

    monkeypatch.setattr(cb, "accuracy", clip_benchmark_accuracy)  # NumPy 2 fix of its float(); same definition

    classes = ["abdomen", "brain", "fundus", "lymph", "melanoma", "pneumonia"]  # in the tokenizer's vocabulary
    root = write_image_folder(tmp_path / "six", classes, per_class=5)
    data = open_classification(root)
    encoder = Encoder(tiny_clip.model, tiny_clip.tokenizer, tiny_clip.preprocess, batch_size=8)
    ours = evaluate_zeroshot(encoder, data)

    class _Dataset(torch.utils.data.Dataset):  # CLIP_benchmark wants (image, target) and a .classes attribute
        def __init__(self, inner):
            self.inner, self.classes = inner, data.prompts.classnames

        def __len__(self):
            return len(self.inner)

        def __getitem__(self, i):
            image, _, label = self.inner[i]
            return image, label

    loader = DataLoader(_Dataset(data.source.torch_dataset(tiny_clip.preprocess)), batch_size=8)
    ref = cb.evaluate(
        tiny_clip.model, loader, tiny_clip.tokenizer, data.prompts.classnames, data.prompts.templates, "cpu", amp=False
    )
    assert ours["top1"] == pytest.approx(ref["acc1"], abs=1e-6)
    assert ours["top5"] == pytest.approx(ref["acc5"], abs=1e-6)
    assert ours["balanced_acc"] == pytest.approx(ref["mean_per_class_recall"], abs=1e-6)
    assert ours["n"] == 30

    # open_clip_train's own zero-shot loop (its classifier, its forward, its accuracy) on the same loader
    open_clip_zero_shot = pytest.importorskip("open_clip_train.zero_shot")
    monkeypatch.setattr(open_clip_zero_shot, "accuracy", lambda out, tgt, topk: [
        n * len(tgt) for n in clip_benchmark_accuracy(out, tgt, topk)
    ])  # fmt: skip
    templates = [t.replace("{c}", "{}") for t in data.prompts.templates]
    classifier = build_zero_shot_classifier(tiny_clip.model, tiny_clip.tokenizer, data.prompts.classnames, templates)
    args = SimpleNamespace(device="cpu", precision="fp32", batch_size=8)
    top1, top5 = open_clip_zero_shot.run(tiny_clip.model, classifier, loader, args)
    assert ours["top1"] == pytest.approx(top1, abs=1e-6) and ours["top5"] == pytest.approx(top5, abs=1e-6)


def test_multilabel_shards_report_map(tiny_clip, project_shards):
    data = open_classification(project_shards, label_prefix="finding:")
    encoder = Encoder(tiny_clip.model, tiny_clip.tokenizer, tiny_clip.preprocess, batch_size=4)
    result = evaluate_zeroshot(encoder, data)
    assert not result["multilabel"] and result["n"] == 10  # one finding per sample: single-label
    data = open_classification(project_shards, label_prefix="")  # every label: several per sample
    result = evaluate_zeroshot(encoder, data)
    assert result["multilabel"] and "mAP" in result and 0 <= result["mAP"] <= 1
