"""The AdamW kernel the module picks: fused where torch has fused kernels (CPU, CUDA), foreach when asked."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from medclip_train.config import ModelConfig, OptimConfig
from medclip_train.module import CLIPModule
from tests.training.conftest import bare_trainer


@pytest.mark.parametrize(
    "precision, fused, expected", [("32-true", None, True), ("bf16-mixed", None, True), ("32-true", False, False)]
)
def test_adamw_kernel_on_cpu(tiny_tokenizer_dir, precision, fused, expected):
    torch.manual_seed(0)
    module = CLIPModule(
        ModelConfig(preset="tiny", tokenizer=str(tiny_tokenizer_dir)), optim=OptimConfig(fused=fused, warmup_steps=1)
    )
    batch = {  # uint8 pixels, as the loader delivers them
        "image": torch.randint(0, 256, (4, 3, 160, 160), dtype=torch.uint8),
        "text": module.tokenizer(["chest x-ray", "ct of the lung", "mri of the brain", "skin lesion"]),
        "key": ["0", "1", "2", "3"],
    }
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer = bare_trainer(devices=1, precision=precision)
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    optimizer = trainer.optimizers[0]
    assert bool(optimizer.defaults["fused"]) is expected
    assert bool(optimizer.defaults["foreach"]) is not expected
    moved = [n for n, p in module.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) > len(before) // 2, "the step must update the weights"


def test_weight_decay_groups_of_the_biomedclip_preset():
    """Which parameters decay, for BiomedCLIP's architecture (built offline from the shipped PubMedBERT config):
    every weight of two or more dimensions, the patch-embedding kernel and the text embeddings included, but timm's
    own ``no_weight_decay()`` names (position embedding, class token); nothing of fewer than two dimensions."""
    from open_clip import CustomTextCLIP

    from medclip_train.optim import param_groups
    from medclip_train.presets import get_preset, resolve_hf_name

    cfg = get_preset("biomedclip_vit_b16_pubmedbert256")["model_cfg"]
    cfg["text_cfg"].update(hf_model_name=resolve_hf_name("builtin:pubmedbert-base"), hf_model_pretrained=False)
    model = CustomTextCLIP(**cfg, output_dict=True)
    groups = param_groups(model, OptimConfig(lr=1e-3, text_lr=1e-4, weight_decay=0.2))
    name_of = {id(p): n for n, p in model.named_parameters()}
    decayed = {name_of[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    kept = {name_of[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    params = dict(model.named_parameters())
    exempt_by_timm = {"visual.trunk.pos_embed", "visual.trunk.cls_token"}
    assert decayed == {n for n, p in params.items() if p.ndim >= 2} - exempt_by_timm
    assert kept == {n for n, p in params.items() if p.ndim < 2} | exempt_by_timm
    assert {"visual.trunk.patch_embed.proj.weight", "text.transformer.embeddings.word_embeddings.weight"} <= decayed
    assert {"logit_scale", "visual.trunk.norm.weight", "text.transformer.encoder.layer.0.output.dense.bias"} <= kept
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == {"image": 1e-3, "image_no_wd": 1e-3, "text": 1e-4, "text_no_wd": 1e-4}
    text_params = {name_of[id(p)] for g in groups if g["name"].startswith("text") for p in g["params"]}
    assert text_params == {n for n in params if n.startswith("text.transformer.")}
