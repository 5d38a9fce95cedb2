"""Training objectives: InfoNCE, MedCLIP's semantic matching, their weighted sum, and SigLIP. Plain torch.

One interface: ``loss(features, labels=None) -> {"loss": total, <part>: value, ...}``. ``features`` is the output
dict of an open_clip model (``output_dict=True``): L2-normalised ``image_features`` and ``text_features``, the
*exponentiated* ``logit_scale`` and, when the model has one, ``logit_bias`` (used by SigLIP only: a scalar bias does
not change a softmax). ``labels`` is the batch's ``(B, C)`` label vectors (one per study, for both sides), needed by
semantic matching only. The result holds ``loss``, the total to back-propagate, and each named part unweighted and
detached, for logging (``itc``, ``sm``). The settings are validated once, in :class:`~medclip_train.config.LossConfig`
(build a loss from one with :func:`build_loss`); the classes here take them as given.

Distributed training: the softmax losses gather the features of all ranks *with* gradient and compute the rows of
this rank's samples against the global batch (open_clip's ``local_loss=True, gather_with_grad=True``). With DDP
averaging the gradients over ranks, that is exactly the gradient of the loss over the global batch (see
``tests/test_losses_ddp.py``). Rank and world size are read from ``torch.distributed`` at every call, so one module
serves single-process runs and Lightning's DDP strategy alike. All ranks must have the same local batch size.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from medclip_train.config import LossConfig
from medclip_train.distributed import gather_no_grad, gather_with_grad, world_info

Features = Mapping[str, torch.Tensor]
"""An open_clip model's output dict (``output_dict=True``), as the module docstring describes."""


@dataclass
class GlobalLogits:
    """This rank's rows of the global similarity matrix, shared by the softmax losses (one gather per step)."""

    logits_per_image: torch.Tensor
    """``(B, N)``: this rank's images against the texts of all ranks, ``N = world_size * B``."""
    logits_per_text: torch.Tensor
    """``(B, N)``: this rank's texts against the images of all ranks."""
    offset: int
    """Global index of this rank's first sample (``rank * B``): local row ``i`` is paired with column ``offset+i``."""


def global_logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> GlobalLogits:
    """Scaled cosine similarities of the local samples against the features gathered (with grad) from all ranks."""
    rank, _ = world_info()
    all_image_features = gather_with_grad(image_features)  # (N, D), rank 0 first
    all_text_features = gather_with_grad(text_features)  # (N, D)
    logits_per_image = logit_scale * image_features @ all_text_features.T  # (B, N)
    logits_per_text = logit_scale * text_features @ all_image_features.T  # (B, N)
    return GlobalLogits(logits_per_image, logits_per_text, offset=rank * image_features.shape[0])


def _logits(features: Features) -> GlobalLogits:
    return global_logits(features["image_features"], features["text_features"], features["logit_scale"])


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE (CLIP) with a learnable temperature, exact under DDP.

    Equal to open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)`` with the rank and world size taken
    from the process group at call time. Labels are accepted and ignored (one call signature for all losses).
    Returns ``{"loss", "itc"}``.
    """

    def __init__(self):
        super().__init__()
        # The target of local row i is its global column offset + i: cached per (device, batch size, offset).
        self._targets: dict[tuple[torch.device, int, int], torch.Tensor] = {}

    def targets(self, device: torch.device, batch_size: int, offset: int) -> torch.Tensor:
        """``(B,)`` global column index of each local sample's pair."""
        key = (device, batch_size, offset)
        if key not in self._targets:
            self._targets[key] = torch.arange(offset, offset + batch_size, device=device, dtype=torch.long)
        return self._targets[key]

    def from_logits(self, logits: GlobalLogits) -> torch.Tensor:
        """The loss of already computed (and gathered) logits."""
        batch_size = logits.logits_per_image.shape[0]
        targets = self.targets(logits.logits_per_image.device, batch_size, logits.offset)
        return (
            F.cross_entropy(logits.logits_per_image, targets) + F.cross_entropy(logits.logits_per_text, targets)
        ) / 2

    def forward(self, features: Features, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        loss = self.from_logits(_logits(features))
        return {"loss": loss, "itc": loss.detach()}


class SemanticMatchingLoss(nn.Module):
    """MedCLIP's semantic matching loss (Wang et al. 2022), made robust: soft targets from label vectors.

    InfoNCE treats every other pair in the batch as a negative, even a study with exactly the same findings;
    with few finding classes and large batches that is most of the batch. MedCLIP replaces the identity target by
    the row-softmax of the label similarity ``image_labels @ text_labels.T`` and takes the cross-entropy against
    the softmax of the logits, in both directions.

    Where MedCLIP's form is weak, and what this class does instead:

    * Raw dot products of multi-hot vectors grow with the number of findings, and a softmax at temperature 1 of
      values in ``{0, 1}`` is nearly uniform over a large batch (the true pair gets ``e / (e + B - 1)``). Here the
      label vectors are cosine-normalised and the softmax has a target temperature ``target_temperature``: towards
      0, the target is uniform over the pairs with the most similar findings (one-hot labels: hard label matching;
      distinct labels: exactly InfoNCE).
    * The true pair is always a full positive (its similarity is set to 1, the cosine maximum), also when one side
      of the pair lacks labels.
    * A sample without labels (an all-zero row) gets the identity target (plain InfoNCE for that row) instead of a
      uniform target; as a column it counts as a negative for labelled rows (similarity 0), as in InfoNCE.
    * Label vectors are gathered across ranks like the features, so that the targets are those of the global
      batch and the loss stays exact under DDP.

    Label vectors are ``(B, C)``, any numeric dtype (multi-hot, or soft / uncertain values). The call takes one
    label vector per study, for both sides; :meth:`from_logits` takes the image's and the text's apart (if only one
    is given it is used for both sides). Returns ``{"loss", "sm"}``.
    """

    def __init__(self, target_temperature: float = 0.1):
        super().__init__()
        self.target_temperature = target_temperature  # > 0, checked by LossConfig

    def soft_targets(self, row_labels: torch.Tensor, column_labels: torch.Tensor, offset: int) -> torch.Tensor:
        """``(B, N)`` target distribution of each local row over the global columns.

        Args:
            row_labels: ``(B, C)`` labels of this rank's samples (the rows).
            column_labels: ``(N, C)`` labels of the global batch (the columns), rank 0 first.
            offset: global index of this rank's first sample.
        """
        rows = F.normalize(row_labels.detach().float(), dim=1)  # all-zero rows stay zero
        columns = F.normalize(column_labels.detach().float(), dim=1)
        # Not under autocast: its bf16 matmul (and the softmax of it) rounded the targets, 1/3 to 0.334.
        with torch.autocast(rows.device.type, enabled=False):
            similarity = rows @ columns.T  # (B, N) cosine of the label vectors
        local = torch.arange(rows.shape[0], device=rows.device)
        pair = local + offset  # (B,) global column of each row's own pair
        similarity[local, pair] = 1.0  # the true pair is always a full positive
        targets = torch.softmax(similarity / self.target_temperature, dim=1)
        identity = F.one_hot(pair, num_classes=columns.shape[0]).to(targets.dtype)
        has_labels = (row_labels != 0).any(dim=1, keepdim=True)  # (B, 1)
        return torch.where(has_labels, targets, identity)

    def from_logits(
        self, logits: GlobalLogits, image_labels: torch.Tensor | None, text_labels: torch.Tensor | None
    ) -> torch.Tensor:
        """The loss of already computed (and gathered) logits."""
        batch_size = logits.logits_per_image.shape[0]
        image_labels, text_labels = _check_labels(image_labels, text_labels, batch_size)
        all_image_labels = gather_no_grad(image_labels)  # (N, C)
        all_text_labels = gather_no_grad(text_labels)  # (N, C)
        image_to_text = self.soft_targets(image_labels, all_text_labels, logits.offset)
        text_to_image = self.soft_targets(text_labels, all_image_labels, logits.offset)
        return (
            _soft_cross_entropy(logits.logits_per_image, image_to_text)
            + _soft_cross_entropy(logits.logits_per_text, text_to_image)
        ) / 2

    def forward(self, features: Features, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``labels`` is required: ``(B, C)``, an all-zero row for a sample without labels."""
        loss = self.from_logits(_logits(features), labels, labels)
        return {"loss": loss, "sm": loss.detach()}


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # In fp32: in a bf16 run the logits are bf16, and casting the probability targets to them rounded soft targets
    # such as 1/3 (to 0.334) and moved the loss by ~1e-3. Upcasting the logits loses nothing.
    return F.cross_entropy(logits.float(), targets.float())


def _check_labels(
    image_labels: torch.Tensor | None, text_labels: torch.Tensor | None, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if image_labels is None and text_labels is None:
        raise ValueError(
            "SemanticMatchingLoss needs labels (image_labels and/or text_labels) of shape (B, C): the batch's "
            "'labels' (data.label_top_k > 0); give samples without labels an all-zero row"
        )
    image_labels = text_labels if image_labels is None else image_labels
    text_labels = image_labels if text_labels is None else text_labels
    for name, labels in (("image_labels", image_labels), ("text_labels", text_labels)):
        if labels.ndim != 2 or labels.shape[0] != batch_size:
            raise ValueError(f"{name} must have shape (B={batch_size}, C), got {tuple(labels.shape)}")
    return image_labels, text_labels


class CombinedLoss(nn.Module):
    """``w_itc * InfoNCE + w_sm * SemanticMatching``, both from one feature gather.

    Returns ``{"loss": the weighted sum, "itc", "sm"}`` with the parts unweighted and detached. A part with weight 0
    is not computed and not returned (``w_sm=0`` needs no labels).
    """

    def __init__(self, w_itc: float = 1.0, w_sm: float = 0.0, sm_target_temperature: float = 0.1):
        super().__init__()
        self.weights = {"itc": w_itc, "sm": w_sm}  # >= 0 and not both 0, checked by LossConfig
        self.itc = ContrastiveLoss()
        self.sm = SemanticMatchingLoss(sm_target_temperature)

    def forward(self, features: Features, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = _logits(features)
        parts = {}
        if self.weights["itc"]:
            parts["itc"] = self.itc.from_logits(logits)
        if self.weights["sm"]:
            parts["sm"] = self.sm.from_logits(logits, labels, labels)
        total = sum(self.weights[name] * value for name, value in parts.items())
        return {"loss": total, **{name: value.detach() for name, value in parts.items()}}


class SigLIPLoss(nn.Module):
    """Sigmoid loss (Zhai et al. 2023), open_clip's ``SigLipLoss`` with rank and world size read at call time.

    Needs the model's learnable ``logit_bias`` (open_clip models have one when built with ``init_logit_bias``,
    -10 in the paper, and then return it in their output dict). Labels are accepted and ignored.
    Returns ``{"loss": weight x the sigmoid loss, "itc": the sigmoid loss}``.
    """

    def __init__(self, weight: float = 1.0, dist_impl: str | None = None):
        super().__init__()
        from open_clip.loss import SigLipLoss

        self.weight = weight
        self.siglip = SigLipLoss(dist_impl=dist_impl)

    def forward(self, features: Features, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if features.get("logit_bias") is None:  # an input check (the config's: config.check_objective)
            raise ValueError(
                "SigLIPLoss needs logit_bias: build the model with a learnable bias (open_clip init_logit_bias, "
                "e.g. -10) and pass the 'logit_bias' of its output dict"
            )
        self.siglip.rank, self.siglip.world_size = world_info()
        loss = self.siglip(
            features["image_features"], features["text_features"], features["logit_scale"], features["logit_bias"]
        )
        return {"loss": self.weight * loss, "itc": loss.detach()}


def build_loss(cfg: LossConfig) -> nn.Module:
    """The objective of a (validated) :class:`LossConfig`: :class:`CombinedLoss` (``kind="clip"``) or
    :class:`SigLIPLoss`, whose weight is ``w_itc``."""
    if cfg.kind == "siglip":
        return SigLIPLoss(weight=cfg.w_itc)
    return CombinedLoss(cfg.w_itc, cfg.w_sm, cfg.sm_target_temperature)


__all__ = [
    "CombinedLoss",
    "ContrastiveLoss",
    "Features",
    "GlobalLogits",
    "SemanticMatchingLoss",
    "SigLIPLoss",
    "build_loss",
    "global_logits",
]
