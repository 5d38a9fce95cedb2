"""Exact accumulation under DDP: two gloo ranks running a real Lightning DDP ``Trainer`` on the CLIPModule end their
step with the same weights as one process trained on the global batch.

The ranks are started here with ``torch.multiprocessing`` and given ``LOCAL_RANK`` (Lightning then treats them as
launched externally, as under torchrun, and does not re-run pytest as a script); each fits one step on its half of a
fixed batch. One spawn runs the case (process start-up dominates the cost).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
from torch.utils.data import DataLoader

from tests.training.conftest import bare_trainer
from tests.training.test_accumulation import GradCapture

WORLD_SIZE = 2
PER_RANK = 6
# 6 samples in 4 micro-batches: Tensor.chunk(4) gives 3 chunks of 2; the short last batch of an exact epoch.
ACCUMULATION = 4
CAPTIONS = [
    "chest x-ray with a nodule on the left",
    "ct scan of the lung with a nodule",
    "mri of the brain demonstrates no acute infarct",
    "histopathology shows invasive ductal carcinoma",
    "normal chest x-ray",
    "small left apical pneumothorax",
    "moderate pulmonary edema, worse than prior",
    "skin lesion consistent with melanoma",
    "right lower lobe opacity concerning for pneumonia",
    "fracture of the distal radius without displacement",
    "ultrasound of the thyroid shows a solid nodule",
    "hyperinflated lungs consistent with emphysema",
]


def _module(tokenizer: str, accumulation_steps: int):
    from medclip_train.config import ModelConfig, OptimConfig
    from medclip_train.module import CLIPModule

    torch.manual_seed(0)  # the same initial weights in every process (DDP would broadcast rank 0's anyway)
    # No clipping and a constant LR from the first step: the comparison sees the gradients, not the schedule.
    # AdamW's first update is lr * g / (|g| + eps): with the default eps (1e-6) a gradient of 1e-7 moves its weight
    # by 1e3 times its float32 rounding noise (about 1e-5 here, the order of the tolerance); eps 1e-3 keeps the
    # weights as well conditioned as the gradients, and a rank stepping on its own half still moves them by ~1e-4.
    optim = OptimConfig(lr=1e-3, eps=1e-3, warmup_steps=0, schedule="constant")
    return CLIPModule(
        ModelConfig(preset="tiny", tokenizer=tokenizer),
        optim=optim,
        accumulation_steps=accumulation_steps,
        grad_clip_norm=0.0,
    )


def _global_batch(module) -> dict:
    gen = torch.Generator().manual_seed(1234)
    n = WORLD_SIZE * PER_RANK
    image = torch.randint(0, 256, (n, 3, 160, 160), dtype=torch.uint8, generator=gen)  # as the loader delivers
    return {"image": image, "text": module.tokenizer(CAPTIONS), "key": [str(i) for i in range(n)]}


def _fit_one_step(module, batch: dict, **trainer_kwargs) -> dict:
    capture = GradCapture()
    trainer = bare_trainer(precision="32-true", callbacks=[capture], use_distributed_sampler=False, **trainer_kwargs)
    trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    params = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    return {"grads": capture.grads, "params": params}


def _worker(rank: int, port: int, tokenizer: str, out_dir: str):
    torch.set_num_threads(1)  # two ranks on a small CPU host
    # LOCAL_RANK makes Lightning's environment "created externally": no launcher, these two processes are the ranks.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", LOCAL_RANK=str(rank))
    module = _module(tokenizer, ACCUMULATION)
    batch = _global_batch(module)
    local = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    local_batch = {key: value[local] for key, value in batch.items()}
    result = _fit_one_step(module, local_batch, devices=WORLD_SIZE, strategy="ddp")
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ddp_accumulation_with_short_batch_equals_one_process_on_global_batch(tmp_path, tiny_tokenizer_dir):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(_free_port(), str(tiny_tokenizer_dir), str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]

    module = _module(str(tiny_tokenizer_dir), accumulation_steps=1)
    reference = _fit_one_step(module, _global_batch(module), devices=1)

    for name, ref in reference["params"].items():
        # Without the all-reduce each rank steps on its own half: the replicas drift apart.
        torch.testing.assert_close(ranks[0]["params"][name], ranks[1]["params"][name], atol=1e-5, rtol=0, msg=name)
    for rank, result in enumerate(ranks):
        assert result["grads"].keys() == reference["grads"].keys(), "every parameter gets a gradient"
        for name, ref in reference["grads"].items():
            # DDP averages the ranks' gradients: the gradient of the loss over the global batch of 12.
            torch.testing.assert_close(result["grads"][name], ref, atol=1e-5, rtol=0, msg=f"rank {rank} grad {name}")
        for name, ref in reference["params"].items():
            torch.testing.assert_close(result["params"][name], ref, atol=1e-5, rtol=0, msg=f"rank {rank} {name}")
