"""AdamW parameter groups and step-based learning-rate schedules, as open_clip and BiomedCLIP train."""

from __future__ import annotations

import math

import torch

from medclip_train.config import OptimConfig


def no_weight_decay_names(model: torch.nn.Module) -> set[str]:
    """Parameters that must not decay: every one with fewer than two dimensions (biases, norm gains, the logit
    scale and bias) and those a submodule names in its own ``no_weight_decay()`` (timm's ViT: ``pos_embed``,
    ``cls_token``), as open_clip, timm and nanoGPT decide.

    Matching names by substrings ("embed", "norm") would also exempt the patch-embedding kernel, a convolution
    that should decay like any other weight.
    """
    names = {name for name, param in model.named_parameters() if param.ndim < 2}
    for prefix, module in model.named_modules():
        own = getattr(module, "no_weight_decay", None)
        if callable(own):
            names |= {f"{prefix}.{n}" if prefix else n for n in own()}
    return names


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """Four groups: (image side | text transformer) x (decay | no decay); the text transformer gets ``text_lr``.

    The text projection is new in every CLIP model, so it learns at ``lr`` with the image side.
    """
    text_lr = cfg.lr if cfg.text_lr is None else cfg.text_lr
    no_decay = no_weight_decay_names(model)
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_text = name.startswith("text.transformer.")
        groups.setdefault((is_text, name in no_decay), []).append(param)
    out = []
    for (is_text, no_wd), params in sorted(groups.items()):
        out.append(
            {
                "params": params,
                "lr": text_lr if is_text else cfg.lr,
                "weight_decay": 0.0 if no_wd else cfg.weight_decay,
                "name": f"{'text' if is_text else 'image'}{'_no_wd' if no_wd else ''}",
            }
        )
    return out


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Multiplier of the base LR at a step: linear warmup, then cosine / constant / constant with cooldown."""
    warmup = cfg.warmup_steps

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        if cfg.schedule == "const-cooldown":
            start = total_steps - cfg.cooldown_steps
            if step < start:
                return 1.0
            progress = min((step - start) / max(cfg.cooldown_steps, 1), 1.0)
            return 1.0 - (1.0 - cfg.min_lr_ratio) * progress
        progress = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, total_steps: int):
    kwargs = {"fused": True} if cfg.fused else {"foreach": True}
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    return optimizer, scheduler
