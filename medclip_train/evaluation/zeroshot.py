"""Zero-shot classification: prompt-ensembled class embeddings and the metrics of ``100 * cosine`` logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.zero_shot_classifier import build_zero_shot_classifier

from medclip_train.evaluation.datasets import ClassificationData
from medclip_train.evaluation.features import Encoder
from medclip_train.evaluation.metrics import ZERO_SHOT_LOGIT_SCALE, classification_metrics, multilabel_metrics
from medclip_train.evaluation.prompts import PromptSet, default_prompt_set, fill_template


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, prompts: PromptSet, device="cpu") -> torch.Tensor:
    """(D, C) class embeddings: per class, the mean of its L2-normalised prompt embeddings, renormalised.

    With templates only this is open_clip's ``build_zero_shot_classifier`` itself. Classes with their own prompt
    list (CuPL-style) get the same ensembling class by class, as CLIP_benchmark does for a dict of prompts
    (open_clip's function needs the same templates for every class).
    """
    was_training = model.training
    model.eval()
    try:
        if not prompts.class_prompts:
            templates = [_Template(t) for t in prompts.templates]
            return build_zero_shot_classifier(model, tokenizer, prompts.classnames, templates, device=device).float()
        columns = []
        for c in range(len(prompts.classes)):
            tokens = tokenizer(prompts.prompts_for(c)).to(device)
            embeddings = model.encode_text(tokens, normalize=True)  # (P, D)
            columns.append(F.normalize(embeddings.mean(dim=0), dim=-1))
        return torch.stack(columns, dim=1).float()
    finally:
        model.train(was_training)


class _Template:
    """A ``{c}`` template as the callable open_clip accepts (its own path calls ``str.format`` with ``{}``)."""

    def __init__(self, template: str):
        self.template = template

    def __call__(self, classname: str) -> str:
        return fill_template(self.template, classname)


def zero_shot_logits(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """(N, C) logits as CLIP_benchmark computes them: ``100 * image_features @ classifier``."""
    return ZERO_SHOT_LOGIT_SCALE * image_features.float() @ classifier.to(image_features.device).float()


def evaluate_zeroshot(
    encoder: Encoder,
    data: ClassificationData,
    max_samples: int | None = None,
    with_outputs: bool = False,
    bootstrap: int = 0,
) -> dict:
    """Encode the images of ``data`` and score them against its prompts.

    Returns:
        The metrics of :func:`classification_metrics` (or :func:`multilabel_metrics`), plus ``task``,
        ``multilabel``, ``skipped`` (samples without a class) and ``prompts`` (the prompt set used). With
        ``with_outputs``, also ``logits`` and ``targets`` tensors. ``bootstrap``: resamples of 95% intervals.
    """
    encoded = encoder.images(data.source, max_samples=max_samples, desc=f"zero-shot {data.name}")
    labelled = data.targets(encoded.metas)
    prompts = data.prompts or default_prompt_set(labelled.classes, data.name)
    if prompts.classes != labelled.classes:
        prompts = prompts.subset(labelled.classes)
    classifier = zero_shot_classifier(encoder.model, encoder.tokenizer, prompts, encoder.device)
    logits = zero_shot_logits(encoded.features[torch.as_tensor(labelled.indices)], classifier.cpu())
    if labelled.multilabel:
        result = multilabel_metrics(logits, labelled.targets, prompts.classnames, bootstrap=bootstrap)
    else:
        result = classification_metrics(logits, labelled.targets, prompts.classnames, bootstrap=bootstrap)
    result.update(task=data.name, multilabel=labelled.multilabel, skipped=labelled.skipped, prompts=prompts.to_dict())
    if with_outputs:
        result.update(logits=logits, targets=torch.as_tensor(labelled.targets))
    return result
