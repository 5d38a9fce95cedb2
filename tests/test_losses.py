"""Single-process checks of the losses against open_clip and against their definitions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from medclip_train.config import LossConfig
from medclip_train.distributed import gather_no_grad, gather_with_grad, world_info
from medclip_train.losses import (
    CombinedLoss,
    ContrastiveLoss,
    GlobalLogits,
    SemanticMatchingLoss,
    SigLIPLoss,
    build_loss,
    global_logits,
)


def _features(batch: int = 8, dim: int = 16, seed: int = 0):
    """Leaf tensors: unit-norm features (normalised inside the graph, as the model does) and an exp'd scale."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, dim, generator=gen, requires_grad=True)
    text = torch.randn(batch, dim, generator=gen, requires_grad=True)
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    return image, text, log_scale


def _output(image, text, scale, logit_bias=None) -> dict:
    """An open_clip model's output dict (``output_dict=True``), what our losses take."""
    out = {"image_features": image, "text_features": text, "logit_scale": scale}
    return out if logit_bias is None else {**out, "logit_bias": logit_bias}


def _loss_and_grads(loss_fn, image, text, log_scale, labels=None, logit_bias=None):
    features = _output(F.normalize(image, dim=-1), F.normalize(text, dim=-1), log_scale.exp(), logit_bias)
    if isinstance(loss_fn, (ClipLoss, SigLipLoss)):  # open_clip's reference: the tensors as arguments
        loss = loss_fn(**features)
    else:
        loss = loss_fn(features, labels)["loss"]
    grads = torch.autograd.grad(loss, (image, text, log_scale))
    return loss.detach(), grads


def _infonce(image, text, scale):
    """InfoNCE written out from its definition: mean of both directions' -log p(pair)."""
    logits = scale * image @ text.T
    return -(logits.log_softmax(1).diagonal().mean() + logits.T.log_softmax(1).diagonal().mean()) / 2


def test_distributed_helpers_are_identity_in_one_process():
    assert world_info() == (0, 1)
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
    detached = gather_no_grad(x)
    assert not detached.requires_grad and torch.equal(detached, x)


def test_contrastive_matches_open_clip_value_and_grads():
    image, text, log_scale = _features()
    ours, our_grads = _loss_and_grads(ContrastiveLoss(), image, text, log_scale)
    ref, ref_grads = _loss_and_grads(ClipLoss(), image, text, log_scale)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    for name, a, b in zip(("image", "text", "logit_scale"), our_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=f"grad wrt {name}")
    assert our_grads[2].abs() > 0  # the temperature is learned
    torch.testing.assert_close(ours, _infonce(F.normalize(image, dim=-1), F.normalize(text, dim=-1), log_scale.exp()))


def test_contrastive_caches_targets_per_device_and_batch_size():
    loss = ContrastiveLoss()
    for batch in (4, 4, 3):
        image, text, log_scale = _features(batch)
        loss(_output(F.normalize(image, dim=-1), F.normalize(text, dim=-1), log_scale.exp()))
    assert sorted(key[1] for key in loss._targets) == [3, 4]


def test_semantic_matching_with_distinct_labels_and_cold_targets_is_infonce():
    image, text, log_scale = _features()
    labels = torch.eye(8)  # every sample its own finding
    ours, our_grads = _loss_and_grads(SemanticMatchingLoss(1e-4), image, text, log_scale, labels=labels)
    ref, ref_grads = _loss_and_grads(ContrastiveLoss(), image, text, log_scale)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_semantic_matching_targets_are_cosine_tempered_and_keep_the_pair():
    sm = SemanticMatchingLoss(target_temperature=0.5)
    labels = torch.tensor([[1.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    targets = sm.soft_targets(labels, labels, offset=0)
    torch.testing.assert_close(targets.sum(1), torch.ones(3))
    cos = 1 / math.sqrt(2)  # [1,1,0] vs [2,0,0]: cosine, not the raw dot product 2
    expected_row0 = torch.softmax(torch.tensor([1.0, cos, 0.0]) / 0.5, 0)
    torch.testing.assert_close(targets[0], expected_row0)
    torch.testing.assert_close(targets[2], torch.tensor([0.0, 0.0, 1.0]))  # no labels: identity
    # A labelled image whose report has no labels still has its own report as a full positive.
    targets = sm.soft_targets(labels[:2], torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]]), offset=0)
    assert targets[0].argmax() == 0


def _same_finding_batch(swap: bool):
    """Six samples on orthonormal axes, except reports 0 and 1 (same finding) whose embeddings are similar (0.8).

    With ``swap`` image 0 sits on report 1 and image 1 on report 0: a confusion between two studies with the same
    findings, which InfoNCE punishes as hard as any other.
    """
    axes = torch.eye(8)
    text = torch.stack([axes[0], 0.8 * axes[0] + 0.6 * axes[1], axes[2], axes[3], axes[4], axes[5]])
    image = text[[1, 0, 2, 3, 4, 5]] if swap else text.clone()
    labels = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]
    )
    return image, text, torch.tensor(20.0), labels


def test_semantic_matching_lowers_the_penalty_for_same_label_pairs():
    image, text, scale, labels = _same_finding_batch(swap=True)
    infonce = ContrastiveLoss()(_output(image, text, scale))["loss"]
    sm = SemanticMatchingLoss(0.1)(_output(image, text, scale), labels)["loss"]
    assert sm < 0.6 * infonce

    # Where each image is nearest its own report, InfoNCE still pushes report 1 away from image 0 (positive
    # gradient on that logit); semantic matching pulls the same-finding pair together (negative gradient).
    image, text, scale, labels = _same_finding_batch(swap=False)
    grads = {}
    for name, loss in (("itc", ContrastiveLoss()), ("sm", SemanticMatchingLoss(0.1))):
        logits = (scale * image @ text.T).requires_grad_(True)  # (B, B) leaf, used in both directions
        parts = GlobalLogits(logits, logits.T, offset=0)
        value = loss.from_logits(parts) if name == "itc" else loss.from_logits(parts, labels, labels)
        (grads[name],) = torch.autograd.grad(value, logits)
    assert grads["itc"][0, 1] > 0
    assert grads["sm"][0, 1] < 0


def test_semantic_matching_rows_without_labels():
    image, text, log_scale = _features(6)
    labels = torch.tensor([[1, 0], [1, 0], [0, 0], [0, 1], [0, 0], [0, 1]])
    loss, grads = _loss_and_grads(SemanticMatchingLoss(0.1), image, text, log_scale, labels=labels)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    # No labels at all: identity target everywhere, i.e. InfoNCE whatever the temperature.
    none, none_grads = _loss_and_grads(SemanticMatchingLoss(0.7), image, text, log_scale, labels=torch.zeros(6, 3))
    ref, ref_grads = _loss_and_grads(ContrastiveLoss(), image, text, log_scale)
    torch.testing.assert_close(none, ref, atol=1e-6, rtol=0)
    for a, b in zip(none_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_semantic_matching_label_errors():
    image, text, log_scale = _features(4)
    with pytest.raises(ValueError, match="image_labels and/or text_labels"):
        SemanticMatchingLoss()(_output(image, text, log_scale.exp()))
    with pytest.raises(ValueError, match=r"text_labels must have shape \(B=4"):
        SemanticMatchingLoss().from_logits(global_logits(image, text, log_scale.exp()), torch.eye(4), torch.eye(3))
    with pytest.raises(ValueError, match="sm_target_temperature"):  # checked in one place: the config
        build_loss(LossConfig(w_sm=1.0, sm_target_temperature=0.0))


def test_semantic_matching_under_bf16_autocast_keeps_soft_targets_in_fp32():
    # 3 samples share one finding and 7 another: at a cold target temperature the soft targets are 1/3 and 1/7,
    # neither representable in bf16 (0.333984375, 0.142578125). Autocast runs the logits' matmul in bf16; the
    # targets (a label matmul and a softmax) and the cross-entropy must still be fp32, as in the fp32 loss of those
    # same bf16-rounded logits.
    image, text, log_scale = _features(10)
    image, text, scale = F.normalize(image, dim=-1), F.normalize(text, dim=-1), log_scale.exp()
    labels = torch.tensor([[1, 0]] * 3 + [[0, 1]] * 7)
    sm = SemanticMatchingLoss(1e-4)
    targets = sm.soft_targets(labels, labels, offset=0)
    assert targets[0, 0] == torch.tensor(1 / 3) and targets[3, 3] == torch.tensor(1 / 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = global_logits(image, text, scale)
        loss = sm(_output(image, text, scale), labels)["loss"]
    assert logits.logits_per_image.dtype == torch.bfloat16, "the test needs bf16 logits"
    fp32 = GlobalLogits(logits.logits_per_image.float(), logits.logits_per_text.float(), logits.offset)
    reference = sm.from_logits(fp32, labels, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference, atol=1e-6, rtol=0)


def _total_and_parts(result: dict) -> tuple[torch.Tensor, dict]:
    return result["loss"], {name: value for name, value in result.items() if name != "loss"}


def test_combined_weights_and_parts():
    image, text, log_scale = _features()
    image, text, scale = F.normalize(image, dim=-1), F.normalize(text, dim=-1), log_scale.exp()
    labels = torch.randint(0, 2, (8, 5))
    loss = build_loss(LossConfig(w_itc=0.3, w_sm=2.0, sm_target_temperature=0.2))
    assert isinstance(loss, CombinedLoss)
    total, parts = _total_and_parts(loss(_output(image, text, scale), labels))
    itc = ContrastiveLoss()(_output(image, text, scale))["loss"]
    sm = SemanticMatchingLoss(0.2)(_output(image, text, scale), labels)["loss"]
    torch.testing.assert_close(parts["itc"], itc.detach())
    torch.testing.assert_close(parts["sm"], sm.detach())
    torch.testing.assert_close(total, 0.3 * itc + 2.0 * sm)
    assert total.requires_grad and not any(p.requires_grad for p in parts.values())
    # Default config: InfoNCE only, no labels needed, logit_bias accepted (model output dicts pass it).
    itc_only = build_loss(LossConfig())
    total, parts = _total_and_parts(itc_only(_output(image, text, scale, logit_bias=torch.tensor(-1.0))))
    assert set(parts) == {"itc"}
    torch.testing.assert_close(total, itc)
    with pytest.raises(ValueError, match="loss.w_itc"):  # checked in one place: the config
        build_loss(LossConfig(w_itc=0.0, w_sm=0.0))


def test_siglip_option_matches_open_clip():
    image, text, log_scale = _features()
    bias = torch.tensor(-10.0, requires_grad=True)
    loss = build_loss(LossConfig(kind="siglip"))
    assert isinstance(loss, SigLIPLoss)
    ours, our_grads = _loss_and_grads(loss, image, text, log_scale, logit_bias=bias)
    ref, ref_grads = _loss_and_grads(SigLipLoss(), image, text, log_scale, logit_bias=bias)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    total, parts = _total_and_parts(
        loss(_output(F.normalize(image, dim=-1), F.normalize(text, dim=-1), log_scale.exp(), logit_bias=bias))
    )
    torch.testing.assert_close(parts["itc"], ref)
    with pytest.raises(ValueError, match="logit_bias"):
        loss(_output(image, text, log_scale.exp()))
    with pytest.raises(ValueError, match="loss.w_sm"):
        build_loss(LossConfig(kind="siglip", w_sm=1.0))
