"""Typed run configuration. Each dataclass validates on construction and names the field that is wrong."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class ModelConfig:
    """What CLIP model to build. Field names are the YAML keys under ``model.model``."""

    preset: str = "tiny"
    """A name from ``medclip_train.model.presets.PRESETS``."""
    tokenizer: str | None = None
    """HF tokenizer name or local folder; default: the preset's (tiny presets have none and need one)."""
    text_model: str | None = None
    """Override of the text tower: HF hub id or local folder with ``config.json`` (and weights if pretrained)."""
    embed_dim: int | None = None
    context_length: int | None = None
    pretrained_image: bool = False
    """Load the timm tower's pretrained weights by its timm name (needs the weights in the local cache offline)."""
    pretrained_text: bool = False
    """Load the HF text tower's pretrained weights from ``text_model`` (hub id or local folder)."""
    init_from: str | None = None
    """Start from full CLIP weights: ``local-dir:DIR``, ``hf-hub:org/repo`` or a project ``.ckpt``."""
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0
    lock_image_freeze_bn_stats: bool = False
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    lock_text_freeze_layer_norm: bool = True
    grad_checkpointing: bool = False
    init_logit_scale: float | None = None
    """Initial ln(scale); default ln(1/0.07) (CLIP). SigLIP uses ln(10)."""
    init_logit_bias: float | None = None
    """Initial logit bias; needed by loss.kind=siglip (SigLIP uses -10)."""
    trust_remote_code: bool = False
    """Passed to Hugging Face loaders; off unless a config says so."""

    def __post_init__(self):
        from medclip_train.model.presets import PRESETS

        if self.preset not in PRESETS:
            raise ValueError(f"model.preset: unknown preset {self.preset!r}; known: {sorted(PRESETS)}")
        for name in ("embed_dim", "context_length"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"model.{name} must be positive, got {value}")
        for name in ("lock_image_unlocked_groups", "lock_text_unlocked_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LossConfig:
    """The training objective: ``w_itc * InfoNCE + w_sm * SemanticMatching`` or SigLIP."""

    kind: str = "clip"
    """``clip`` (InfoNCE, optionally plus semantic matching) or ``siglip``."""
    w_itc: float = 1.0
    w_sm: float = 0.0
    sm_target_temperature: float = 0.1
    """Temperature of the soft targets of the semantic matching loss (towards 0: hard label matching)."""

    def __post_init__(self):
        if self.kind not in ("clip", "siglip"):
            raise ValueError(f"loss.kind must be 'clip' or 'siglip', got {self.kind!r}")
        if self.w_itc < 0 or self.w_sm < 0 or (self.kind == "clip" and self.w_itc + self.w_sm == 0):
            raise ValueError(f"loss.w_itc and loss.w_sm must be >= 0 and not both 0, got {self.w_itc}, {self.w_sm}")
        if self.sm_target_temperature <= 0:
            raise ValueError("loss.sm_target_temperature must be > 0")


@dataclass
class OptimConfig:
    """AdamW and a step-based schedule, as open_clip and BiomedCLIP train."""

    lr: float = 5e-4
    text_lr: float | None = None
    """Learning rate of the text tower (lower for a pretrained PubMedBERT); default: ``lr``."""
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: str = "cosine"
    """``cosine``, ``constant`` or ``const-cooldown`` (constant, then linear cooldown over ``cooldown_steps``)."""
    cooldown_steps: int = 0
    min_lr_ratio: float = 0.0
    max_logit_scale: float = 100.0
    """The logit scale is clamped to ln(max_logit_scale) after every step."""
    fused: bool | None = None
    """Fused AdamW (default: on CPU and CUDA, except with 16-mixed; on CPU 10 instead of 34 ms per optimizer step
    for the bench model). ``false``: foreach AdamW."""

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant", "const-cooldown"):
            raise ValueError(f"optim.schedule must be cosine, constant or const-cooldown, got {self.schedule!r}")
        if self.lr <= 0 or (self.text_lr is not None and self.text_lr < 0):
            raise ValueError("optim.lr must be > 0 and optim.text_lr >= 0")
        if self.warmup_steps < 0 or self.cooldown_steps < 0:
            raise ValueError("optim.warmup_steps and optim.cooldown_steps must be >= 0")
        self.betas = tuple(self.betas)


__all__ = ["ModelConfig", "LossConfig", "OptimConfig", "field"]
