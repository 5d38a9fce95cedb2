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
