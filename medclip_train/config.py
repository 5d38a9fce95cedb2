"""Typed run configuration. Each dataclass validates on construction and names the field that is wrong."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# timm ViT global_pool values (timm.models.vision_transformer), as open_clip passes timm_pool on to timm.
IMAGE_POOLS = ("token", "avg", "max", "avgmax", "map")


@dataclass
class ModelConfig:
    """What CLIP model to build. Field names are the YAML keys under ``model.clip`` (flags ``--model.clip.*``)."""

    preset: str = "tiny"
    """Towers, sizes and image preprocessing: a key of ``PRESETS`` in medclip_train/presets.py (``tiny``,
    ``biomedclip_vit_b16_pubmedbert256`` ...)."""
    tokenizer: str | None = None
    """HF tokenizer name or local folder; default: the preset's (tiny presets have none and need one)."""
    text_model: str | None = None
    """Override of the text tower: HF hub id or local folder with ``config.json`` (and weights if pretrained)."""
    embed_dim: int | None = None
    """Width of the shared image-text embedding; default: the preset's."""
    context_length: int | None = None
    """Text tokens per caption, [CLS] and [SEP] included (longer captions are cut); default: the preset's."""
    image_pool: str | None = None
    """How the timm image tower pools its tokens into one vector: ``token`` (the class token: ViT's default and
    BiomedCLIP's), ``avg``, ``max`` (any patch that shows it: a detector's choice, the demo's), ``avgmax``, ``map``
    (attention pooling, SigLIP's); default: the preset's."""
    pretrained_image: bool = False
    """Load the timm tower's pretrained weights by its timm name (needs the weights in the local cache offline)."""
    pretrained_text: bool = False
    """Load the HF text tower's pretrained weights from ``text_model`` (hub id or local folder)."""
    init_from: str | None = None
    """Start from full CLIP weights: ``local-dir:DIR``, ``hf-hub:org/repo`` or a project ``.ckpt``."""
    lock_image: bool = False
    """Freeze the image tower (LiT); its projection head stays trainable."""
    lock_image_unlocked_groups: int = 0
    """With ``lock_image``: leave this many last layer groups of the image tower trainable."""
    lock_image_freeze_bn_stats: bool = False
    """With ``lock_image``: also freeze batch-norm running statistics."""
    lock_text: bool = False
    """Freeze the text tower; its projection stays trainable."""
    lock_text_unlocked_layers: int = 0
    """With ``lock_text``: leave this many last encoder layers (and the pooler) trainable."""
    lock_text_freeze_layer_norm: bool = True
    """With ``lock_text``: also freeze the layer norms of the locked layers."""
    grad_checkpointing: bool = False
    """Recompute activations in the backward pass: less activation memory for one more forward pass per step."""
    init_logit_scale: float | None = None
    """Initial ln(scale); default ln(1/0.07) (CLIP). SigLIP uses ln(10)."""
    init_logit_bias: float | None = None
    """Initial logit bias; needed by loss.kind=siglip (SigLIP uses -10)."""
    trust_remote_code: bool = False
    """Passed to Hugging Face loaders; off unless a config says so."""

    def __post_init__(self):
        from medclip_train.presets import PRESETS

        if self.preset not in PRESETS:
            raise ValueError(f"model.clip.preset: unknown preset {self.preset!r}; known: {sorted(PRESETS)}")
        if self.image_pool is not None and self.image_pool not in IMAGE_POOLS:
            raise ValueError(f"model.clip.image_pool: unknown pooling {self.image_pool!r}; known: {list(IMAGE_POOLS)}")
        for name in ("embed_dim", "context_length"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"model.clip.{name} must be positive, got {value}")
        for name in ("lock_image_unlocked_groups", "lock_text_unlocked_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.clip.{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LossConfig:
    """The training objective: ``w_itc * InfoNCE + w_sm * SemanticMatching`` or SigLIP (``--model.loss.*``)."""

    kind: str = "clip"
    """``clip`` (InfoNCE, optionally plus semantic matching) or ``siglip``."""
    w_itc: float = 1.0
    """Weight of the InfoNCE (image-text contrastive) loss."""
    w_sm: float = 0.0
    """Weight of MedCLIP's semantic matching loss (soft targets from shared labels; needs ``data.label_top_k``)."""
    sm_target_temperature: float = 0.1
    """Temperature of the soft targets of the semantic matching loss (towards 0: hard label matching)."""

    def __post_init__(self):
        if self.kind not in ("clip", "siglip"):
            raise ValueError(f"model.loss.kind must be 'clip' or 'siglip', got {self.kind!r}")
        if self.w_itc < 0 or self.w_sm < 0 or (self.kind == "clip" and self.w_itc + self.w_sm == 0):
            raise ValueError(
                f"model.loss.w_itc and model.loss.w_sm must be >= 0 and not both 0, got {self.w_itc}, {self.w_sm}"
            )
        if self.sm_target_temperature <= 0:
            raise ValueError(f"model.loss.sm_target_temperature must be > 0, got {self.sm_target_temperature}")
        if self.kind == "siglip" and self.w_sm:
            raise ValueError("model.loss.w_sm: semantic matching is a softmax objective; use it with loss.kind='clip'")
        if self.kind == "siglip" and self.w_itc <= 0:
            raise ValueError(f"model.loss.w_itc: the weight of the SigLIP loss must be > 0, got {self.w_itc}")


def check_objective(clip: ModelConfig, loss: LossConfig) -> None:
    """The checks of a loss against the model it trains (each config is valid alone): SigLIP needs the model's
    logit bias, and only SigLIP may have one."""
    if clip.init_logit_bias is not None and loss.kind != "siglip":
        # A softmax ignores a constant bias: the trainable parameter would never get a gradient, and DDP (second
        # step: "Expected to have finished reduction") and accumulation (autograd.grad of an unused leaf) fail.
        raise ValueError(
            f"model.clip.init_logit_bias={clip.init_logit_bias} is only used by model.loss.kind=siglip, "
            f"not by model.loss.kind={loss.kind}: remove init_logit_bias or set loss.kind=siglip"
        )
    if loss.kind == "siglip" and clip.init_logit_bias is None:
        raise ValueError("model.loss.kind=siglip needs a logit bias: set model.clip.init_logit_bias (SigLIP: -10.0)")


@dataclass
class OptimConfig:
    """AdamW and a step-based schedule, as open_clip and BiomedCLIP train (``--model.optim.*``)."""

    lr: float = 5e-4
    """Peak learning rate (after warmup)."""
    text_lr: float | None = None
    """Learning rate of the text tower (lower for a pretrained PubMedBERT); default: ``lr``."""
    weight_decay: float = 0.2
    """AdamW weight decay; none on biases, norms, embeddings and the logit scale."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""
    eps: float = 1e-6
    """AdamW epsilon."""
    warmup_steps: int = 100
    """Linear warmup from 0 to ``lr`` over this many optimizer steps."""
    schedule: str = "cosine"
    """``cosine``, ``constant`` or ``const-cooldown`` (constant, then linear cooldown over ``cooldown_steps``)."""
    cooldown_steps: int = 0
    """Length of the final linear cooldown of ``const-cooldown``."""
    min_lr_ratio: float = 0.0
    """Lowest learning rate of the decay, as a fraction of ``lr``."""
    max_logit_scale: float = 100.0
    """The logit scale is clamped to ln(max_logit_scale) after every step."""
    fused: bool | None = None
    """Fused AdamW (default: on CPU and CUDA, except with 16-mixed; on CPU 10 instead of 34 ms per optimizer step
    for the bench model). ``false``: foreach AdamW."""

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant", "const-cooldown"):
            raise ValueError(f"model.optim.schedule must be cosine, constant or const-cooldown, got {self.schedule!r}")
        if self.lr <= 0 or (self.text_lr is not None and self.text_lr < 0):
            raise ValueError(f"model.optim.lr must be > 0 and model.optim.text_lr >= 0, got {self.lr}, {self.text_lr}")
        if self.warmup_steps < 0 or self.cooldown_steps < 0:
            raise ValueError(
                "model.optim.warmup_steps and model.optim.cooldown_steps must be >= 0, got "
                f"{self.warmup_steps}, {self.cooldown_steps}"
            )
        self.betas = tuple(self.betas)


__all__ = ["ModelConfig", "LossConfig", "OptimConfig", "check_objective", "field"]
