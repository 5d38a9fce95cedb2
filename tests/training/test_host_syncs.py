"""Host reads of device values in the training step, and tensors made from Python numbers: each is a device sync on
CUDA (the host waits for every queued kernel), so the step must not make any outside logging steps. On CPU there is
no sync to time, but the mechanism is visible: a ``TorchFunctionMode`` sees every ``item()``/``bool()``/``float()``
of a tensor and every tensor made from a Python number."""

from __future__ import annotations

import sys

import lightning as L
from torch.overrides import TorchFunctionMode

from medclip_train.callbacks import RunSummary
from medclip_train.config import ModelConfig
from medclip_train.data.datamodule import WebDataModule
from medclip_train.module import CLIPModule
from tests.shardkit import make_shards, shard_pattern
from tests.training.conftest import bare_trainer

HOST_READS = {"item", "__bool__", "__float__", "__int__", "tolist", "numpy", "__index__"}


class CountHostReads(TorchFunctionMode):
    """Host reads, by the file that made them. transformers' BERT makes one per text forward (``padding_mask.all()``
    in masking_utils, to pick a mask-free attention kernel): not ours to change, so counted apart."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("tensor", "as_tensor") and args and isinstance(args[0], (int, float)):
            name = "tensor(python number)"  # on CUDA a host-to-device copy: self.log of a float does this
        if name in HOST_READS or name == "tensor(python number)":
            caller = sys._getframe(1).f_code.co_filename
            if "/transformers/" not in caller:
                self.reads.append(f"{name} in {caller}:{sys._getframe(1).f_lineno}")
        return func(*args, **(kwargs or {}))


class ReadsPerStep(L.Callback):
    """Counts host reads from the start to the end of each training batch (step, backward, optimizer, logging)."""

    def __init__(self):
        self.per_step: dict[int, list[str]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.mode = CountHostReads()
        self.mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.mode.__exit__(None, None, None)
        self.per_step[trainer.global_step] = self.mode.reads


def test_a_training_step_reads_no_device_value_outside_logging_steps(tmp_path, tiny_tokenizer_dir):
    module = CLIPModule(ModelConfig(preset="tiny", tokenizer=str(tiny_tokenizer_dir)))
    dm = WebDataModule(train=shard_pattern(make_shards(tmp_path, [16], image_size=64)), batch_size=4, num_workers=0)
    dm.connect(module.tokenizer, module.preprocess_cfg)
    counter = ReadsPerStep()
    trainer = bare_trainer(
        max_steps=8,
        log_every_n_steps=4,
        callbacks=[RunSummary(), counter],  # RunSummary logs samples/s, as the CLI adds it; the counter ends last
        precision="bf16-mixed",
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=dm)
    assert module.optimizers().optimizer.defaults["fused"], "the device-side skip needs fused AdamW"
    # Step 1 is left out: Lightning's result collection makes its accumulators the first time a key is logged.
    quiet = {step: reads for step, reads in counter.per_step.items() if step % 4 != 0 and step > 1}
    assert quiet and all(reads == [] for reads in quiet.values()), quiet
