"""Exact contrastive accumulation: k micro-batches of B give the gradients of one batch of k x B."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from medclip_train.config import ModelConfig
from medclip_train.module import CLIPModule
from tests.training.conftest import bare_trainer

CAPTIONS = [
    "chest x-ray with a nodule on the left",
    "ct scan of the lung with a nodule",
    "mri of the brain demonstrates no acute infarct",
    "histopathology shows invasive ductal carcinoma",
    "normal chest x-ray",
    "small left apical pneumothorax",
    "moderate pulmonary edema, worse than prior",
    "skin lesion consistent with melanoma",
]


class GradCapture(L.Callback):
    """The gradients as the optimizer would see them, before the module's clipping and non-finite check."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters() if p.grad is not None}


def lightning_grads(module: CLIPModule, batch: dict) -> dict[str, torch.Tensor]:
    """One real ``Trainer.fit`` step of ``module`` on ``batch``; returns the gradients it computed."""
    capture = GradCapture()
    trainer = bare_trainer(devices=1, precision="32-true", callbacks=[capture])
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    assert trainer.accumulate_grad_batches == 1, "Lightning's accumulation would contrast micro-batches apart"
    return capture.grads


def reference_grads(module: CLIPModule, batch: dict, micro_batches: int = 1) -> dict[str, torch.Tensor]:
    """Plain torch: forward, ``ContrastiveLoss`` and backward on the whole batch (or the naive average of
    independent micro-batch losses, which is what per-micro-batch accumulation computes)."""
    model = module.model.train()
    model.zero_grad(set_to_none=True)
    for images, text in zip(batch["image"].chunk(micro_batches), batch["text"].chunk(micro_batches)):
        out = model(images, text)
        loss = module.loss(out)["loss"]
        (loss / micro_batches).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def module_and_batch(tiny_tokenizer_dir):
    torch.manual_seed(0)
    module = CLIPModule(
        ModelConfig(preset="tiny", tokenizer=str(tiny_tokenizer_dir)), accumulation_steps=4, grad_clip_norm=0.0
    )
    batch = {
        "image": torch.randn(8, 3, 160, 160),
        "text": module.tokenizer(CAPTIONS),
        "key": [str(i) for i in range(8)],
    }
    return module, batch


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def test_grad_cache_of_4_micro_batches_equals_one_batch_of_4b(module_and_batch):
    module, batch = module_and_batch
    assert module.automatic_optimization is False
    reference = reference_grads(copy.deepcopy(module), batch)
    accumulated = lightning_grads(copy.deepcopy(module), batch)
    assert len(accumulated) == len(list(module.model.parameters())), "every parameter gets a gradient"
    assert max_abs_diff(accumulated, reference) < 1e-5


def test_naive_micro_batch_accumulation_would_differ(module_and_batch):
    # The check above can fail: contrasting each micro-batch only with itself gives other gradients.
    module, batch = module_and_batch
    reference = reference_grads(copy.deepcopy(module), batch)
    naive = reference_grads(copy.deepcopy(module), batch, micro_batches=4)
    assert max_abs_diff(naive, reference) > 1e-3


def test_lightning_accumulate_grad_batches_is_refused_with_manual_optimisation(module_and_batch):
    module, batch = module_and_batch
    trainer = bare_trainer(accumulate_grad_batches=4)
    with pytest.raises(Exception, match="accumulate_grad_batches"):
        trainer.fit(copy.deepcopy(module), train_dataloaders=DataLoader([batch], batch_size=None))


def test_grad_cache_with_fewer_samples_per_micro_batch_than_chunk_size_equals_one_batch(module_and_batch):
    # 6 samples in 4 micro-batches: Tensor.chunk(4) gives 3 chunks of 2, so a loop that expects 4 never reaches its
    # "last" micro-batch and the logit scale's gradient (split as 1/k per micro-batch) comes out 3/4 of its value.
    # This is the short last batch of an exact epoch.
    module, batch = module_and_batch
    small = {"image": batch["image"][:6], "text": batch["text"][:6], "key": batch["key"][:6]}
    reference = reference_grads(copy.deepcopy(module), small)
    accumulated = lightning_grads(copy.deepcopy(module), small)
    assert len(accumulated) == len(list(module.model.parameters())), "every parameter gets a gradient"
    assert max_abs_diff(accumulated, reference) < 1e-5
