"""Build the CLIP model of a :class:`ModelConfig`: open_clip's ``CustomTextCLIP`` with a timm and an HF tower."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from open_clip.model import CustomTextCLIP
from open_clip.tokenizer import HFTokenizer

from medclip_train.config import ModelConfig
from medclip_train.presets import get_preset, resolve_hf_name


@dataclass
class BuiltModel:
    model: CustomTextCLIP
    tokenizer: HFTokenizer
    model_cfg: dict
    """The open_clip model config the model was built from (``builtin:`` names kept, for export)."""
    preprocess_cfg: dict


def resolve_open_clip_cfg(cfg: ModelConfig) -> tuple[dict, dict]:
    """The preset's open_clip ``model_cfg`` and ``preprocess_cfg`` with this config's overrides applied."""
    preset = get_preset(cfg.preset)
    model_cfg, preprocess_cfg = preset["model_cfg"], preset["preprocess_cfg"]
    text_cfg, vision_cfg = model_cfg["text_cfg"], model_cfg["vision_cfg"]
    if cfg.text_model:
        text_cfg["hf_model_name"] = cfg.text_model
    if cfg.tokenizer:
        text_cfg["hf_tokenizer_name"] = cfg.tokenizer
    if cfg.embed_dim:
        model_cfg["embed_dim"] = cfg.embed_dim
    if cfg.context_length:
        text_cfg["context_length"] = cfg.context_length
    if cfg.image_pool:
        vision_cfg["timm_pool"] = cfg.image_pool
    vision_cfg["timm_model_pretrained"] = cfg.pretrained_image
    text_cfg["hf_model_pretrained"] = cfg.pretrained_text
    preprocess_cfg["size"] = vision_cfg["image_size"]
    if cfg.init_logit_scale is not None:
        model_cfg["init_logit_scale"] = cfg.init_logit_scale
    if cfg.init_logit_bias is not None:
        model_cfg["init_logit_bias"] = cfg.init_logit_bias
    return model_cfg, preprocess_cfg


# Flags of how the weights were first obtained, not of what the model computes: a loaded checkpoint ignores them.
_LOAD_FLAGS = ("timm_model_pretrained", "hf_model_pretrained")


def preset_drift(clip_fields: dict, trained_model_cfg: dict) -> str | None:
    """What a checkpoint's ``model.clip`` config builds today, against the ``model_cfg`` it was trained with (saved
    in the checkpoint as ``architecture``): ``None`` when equal, else the first differing key as one line.

    A model is rebuilt from its config by preset name, so a preset whose definition changed between versions would
    build another architecture; where no weight changes shape (a pooling, an activation) every tensor still loads.
    """
    known = {k: v for k, v in clip_fields.items() if k in ModelConfig.__dataclass_fields__}
    now, _ = resolve_open_clip_cfg(ModelConfig(**known))
    # keys a config field sets are the config's, checked as fields (resume.MODEL_FIELDS), not the preset's
    own = {key for key, field in _FIELD_KEYS.items() if known.get(field) is not None}
    differences = _first_difference(trained_model_cfg, now, skip=own)
    if differences is None:
        return None
    key, before, after = differences
    return (
        f"model.clip.preset: preset {known.get('preset')!r} now builds {key}={after!r}, but this checkpoint was "
        f"trained with {before!r} (the preset's definition changed since): use the medclip-train version it was "
        "trained with"
    )


_FIELD_KEYS = {
    "text_cfg.hf_model_name": "text_model",
    "text_cfg.hf_tokenizer_name": "tokenizer",
    "text_cfg.context_length": "context_length",
    "embed_dim": "embed_dim",
    "vision_cfg.timm_pool": "image_pool",
    "init_logit_scale": "init_logit_scale",
    "init_logit_bias": "init_logit_bias",
}


def _first_difference(before, after, prefix: str = "", skip: set[str] = frozenset()):
    if isinstance(before, dict) and isinstance(after, dict):
        for key in sorted(set(before) | set(after)):
            if key in _LOAD_FLAGS or f"{prefix}{key}" in skip:
                continue
            found = _first_difference(before.get(key), after.get(key), f"{prefix}{key}.", skip)
            if found:
                return found
        return None
    if isinstance(before, (list, tuple)) and isinstance(after, (list, tuple)):
        before, after = list(before), list(after)
    return None if before == after else (prefix.rstrip("."), before, after)


class RemoteCodeRefused(ValueError):
    """A text tower config or tokenizer asks Hugging Face to run Python code shipped with it, and the user did not
    opt in. Only the user's own flag or config may (``--trust-remote-code``, ``model.clip.trust_remote_code``), never
    a value read from a checkpoint, an open_clip folder or a hub repo."""

    def __init__(self, name: str, filename: str, reference):
        super().__init__(
            f"{name}: {filename} asks to run Python code shipped with the model (auto_map {reference}), which is not "
            "run unless you pass --trust-remote-code (medclip-eval, medclip-export) or set "
            "model.clip.trust_remote_code: true (training); turn it on only for code you trust"
        )


def remote_code_reference(path: str, filename: str, auto_class: str):
    """The ``auto_map`` entry for ``auto_class`` in ``filename`` of a local folder or a cached hub repo, or ``None``.

    Reads the JSON only (runs nothing, downloads nothing): it explains an error transformers already raised.
    """
    from huggingface_hub import try_to_load_from_cache

    local = Path(path) / filename
    try:
        file = local if local.is_file() else try_to_load_from_cache(path, filename)
    except ValueError:  # not a valid repo id either
        return None
    if not isinstance(file, (str, Path)) or not Path(file).is_file():
        return None
    try:
        data = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    auto_map = data.get("auto_map") if isinstance(data, dict) else None
    return auto_map.get(auto_class) if isinstance(auto_map, dict) else None


def load_text_config(name: str, trust_remote_code: bool = False, field_name: str = "model.clip.text_model"):
    """The HF config of the text tower, with an actionable error when it cannot be found offline.

    ``trust_remote_code`` is passed to transformers explicitly (its default ``None`` prompts on a terminal): with
    ``False`` a config whose ``model_type`` transformers knows loads with transformers' own class, and one that
    needs its ``auto_map`` code is refused with :class:`RemoteCodeRefused`. ``field_name`` is the setting the error
    names (where ``name`` came from).
    """
    from transformers import AutoConfig

    path = resolve_hf_name(name)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        reference = None if trust_remote_code else remote_code_reference(path, "config.json", "AutoConfig")
        if reference is not None:
            raise RemoteCodeRefused(name, "config.json", reference) from err
        raise FileNotFoundError(_missing_hf_message(field_name, name, "config.json")) from err


def _missing_hf_message(field_name: str, name: str, filename: str) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    return (
        f"{field_name}={name!r}: could not load {filename!r}"
        + (" (HF_HUB_OFFLINE=1 and it is not in the local cache)" if offline else "")
        # `hf` is the CLI of huggingface_hub >= 1.0, which no longer ships `huggingface-cli`.
        + f". Download it once on a machine with network (`hf download {name} --local-dir DIR`) and point "
        + f"{field_name} at DIR, or at any local folder that holds {filename}."
    )


def validate_model_config(cfg: ModelConfig) -> tuple[dict, dict]:
    """Cheap checks before any heavy work: tower names exist, context fits the text tower, tokenizer given."""
    import timm

    model_cfg, preprocess_cfg = resolve_open_clip_cfg(cfg)
    timm_name = model_cfg["vision_cfg"]["timm_model_name"]
    if not timm.is_model(timm_name):
        raise ValueError(f"model.clip.preset={cfg.preset!r}: its image tower {timm_name!r} is not a timm model")
    text_cfg = model_cfg["text_cfg"]
    hf_config = load_text_config(text_cfg["hf_model_name"], cfg.trust_remote_code)
    max_positions = getattr(hf_config, "max_position_embeddings", None)
    if max_positions is not None and text_cfg["context_length"] > max_positions:
        raise ValueError(
            f"model.clip.context_length={text_cfg['context_length']} exceeds the text tower's maximum "
            f"max_position_embeddings={max_positions} ({text_cfg['hf_model_name']})"
        )
    if not text_cfg.get("hf_tokenizer_name"):
        raise ValueError(
            f"model.clip.tokenizer: preset {cfg.preset!r} has no tokenizer; set model.clip.tokenizer to a HF tokenizer "
            "name or folder (the demo data ships one in DATA/tokenizer)"
        )
    return model_cfg, preprocess_cfg


def build_tokenizer(model_cfg: dict, trust_remote_code: bool = False) -> HFTokenizer:
    text_cfg = model_cfg["text_cfg"]
    name = text_cfg["hf_tokenizer_name"]
    path = resolve_hf_name(name)
    try:
        # Explicit, as for the config: transformers' default (None) would prompt for a tokenizer with an auto_map.
        return HFTokenizer(path, context_length=text_cfg["context_length"], trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        reference = None if trust_remote_code else remote_code_reference(path, "tokenizer_config.json", "AutoTokenizer")
        if reference is not None:
            raise RemoteCodeRefused(name, "tokenizer_config.json", reference) from err
        raise FileNotFoundError(_missing_hf_message("model.clip.tokenizer", name, "tokenizer files")) from err


def build_model(cfg: ModelConfig) -> BuiltModel:
    """Validate, build the towers through open_clip/timm/transformers, load weights, lock, and tokenizer."""
    model_cfg, preprocess_cfg = validate_model_config(cfg)
    tokenizer = build_tokenizer(model_cfg, cfg.trust_remote_code)  # before the towers: fail fast if missing
    build_cfg = {**model_cfg, "text_cfg": dict(model_cfg["text_cfg"])}
    build_cfg["text_cfg"]["hf_model_name"] = resolve_hf_name(build_cfg["text_cfg"]["hf_model_name"])
    try:
        model = CustomTextCLIP(**build_cfg, output_dict=True)
    except OSError as err:  # pretrained weights requested but not available offline
        name = model_cfg["text_cfg"]["hf_model_name"]
        raise FileNotFoundError(_missing_hf_message("model.clip.text_model", name, "model weights")) from err
    if cfg.init_from:
        from medclip_train.model.weights import load_clip_weights

        load_clip_weights(model, cfg.init_from, model_cfg["vision_cfg"].get("timm_pool") or "token")
    apply_locks(model, cfg)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return BuiltModel(model, tokenizer, model_cfg, preprocess_cfg)


def apply_locks(model: CustomTextCLIP, cfg: ModelConfig) -> None:
    """LiT-style locking. Projections (image head, text proj) always stay trainable."""
    if cfg.lock_image:
        model.lock_image_tower(cfg.lock_image_unlocked_groups, cfg.lock_image_freeze_bn_stats)
    if cfg.lock_text:
        lock_text_tower(model.text, cfg.lock_text_unlocked_layers, cfg.lock_text_freeze_layer_norm)


def lock_text_tower(text, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
    """Freeze the HF transformer except its last ``unlocked_layers`` encoder layers (and the pooler).

    Written here because open_clip 3.3's ``HFTextEncoder.lock`` looks up ``layer_attr`` in its arch table,
    which has no entry for BERT, so unlocking the last N layers of PubMedBERT raises ``KeyError``.
    """
    transformer = text.transformer
    encoder = getattr(transformer, "encoder", transformer)
    layers = getattr(encoder, "layer", None) or getattr(encoder, "layers", None)
    if layers is None:
        raise ValueError(f"model.clip.lock_text_unlocked_layers: cannot find the layer list of {type(transformer)}")
    if unlocked_layers > len(layers):
        raise ValueError(f"model.clip.lock_text_unlocked_layers={unlocked_layers} > {len(layers)} layers in the tower")
    unlocked = {id(p) for layer in list(layers)[len(layers) - unlocked_layers :] for p in layer.parameters()}
    pooler = getattr(transformer, "pooler", None)
    if pooler is not None and unlocked_layers > 0:
        unlocked |= {id(p) for p in pooler.parameters()}
    for name, param in transformer.named_parameters():
        if id(param) in unlocked:
            continue
        is_norm = "LayerNorm" in name.split(".") or "layer_norm" in name
        param.requires_grad = (not freeze_layer_norm) and is_norm


def set_fused_attention(model: torch.nn.Module, enabled: bool) -> int:
    """Switch timm's attention blocks between fused SDPA and the explicit ``softmax(q k^T) v``; returns how many.

    On CPU the explicit path is faster at ViT sequence lengths: 1.31 vs 1.48 s per step of the bench model
    (vit_tiny at 224 px, batch 32, bf16) on 2 cores, +20% samples/s end to end (BENCHMARKS.md). It keeps the
    (B, heads, N, N) attention weights for backward, which the fused kernel recomputes; GPUs keep the fused kernel.
    """
    switched = 0
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = enabled
            switched += 1
    return switched


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
