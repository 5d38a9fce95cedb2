"""DDP exactness: two gloo processes on CPU give the gradients of one process on the concatenated batch.

Each rank gets its half of a fixed global batch, runs a two-tower model wrapped in ``DistributedDataParallel``
and backpropagates its local loss; DDP averages the gradients. They must equal the gradients of the same loss
computed in this process on the whole batch. One spawn runs every case (process start-up dominates the cost).
"""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

WORLD_SIZE = 2
GLOBAL_BATCH = 8
CASES = ("itc", "sm", "combined", "siglip")


class TwoTowers(nn.Module):
    """Linear "towers" and a learnable logit scale, returning an open_clip-style output dict."""

    def __init__(self, with_bias: bool = False):
        super().__init__()
        self.image_tower = nn.Linear(12, 6)
        self.text_tower = nn.Linear(10, 6)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # Only when the loss uses it: an unused parameter would leave its DDP bucket un-reduced.
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if with_bias else None

    def forward(self, images, texts):
        out = {
            "image_features": F.normalize(self.image_tower(images), dim=-1),
            "text_features": F.normalize(self.text_tower(texts), dim=-1),
            "logit_scale": self.logit_scale.exp(),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out


def _global_batch():
    gen = torch.Generator().manual_seed(1234)
    images = torch.randn(GLOBAL_BATCH, 12, generator=gen)
    texts = torch.randn(GLOBAL_BATCH, 10, generator=gen)
    # Findings shared across the two halves (so that targets span ranks), and unlabelled rows on both ranks.
    labels = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 1, 1], [1, 1, 0]])
    return images, texts, labels


def _make(case: str):
    from medclip_train.losses import CombinedLoss, ContrastiveLoss, SemanticMatchingLoss, SigLIPLoss

    torch.manual_seed(0)  # same initial weights in every process (DDP would broadcast rank 0's anyway)
    model = TwoTowers(with_bias=case == "siglip")
    loss = {
        "itc": ContrastiveLoss(),
        "sm": SemanticMatchingLoss(target_temperature=0.3),
        "combined": CombinedLoss(w_itc=0.5, w_sm=1.5, sm_target_temperature=0.2),
        "siglip": SigLIPLoss(),
    }[case]
    return model, loss


def _step(model, loss_fn, images, texts, labels, wrapper=None):
    out = (wrapper or model)(images, texts)
    loss = loss_fn(out, labels)["loss"]
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _worker(rank: int, port: int, out_dir: str):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        images, texts, labels = _global_batch()
        local = slice(rank * GLOBAL_BATCH // WORLD_SIZE, (rank + 1) * GLOBAL_BATCH // WORLD_SIZE)
        results = {}
        for case in CASES:
            model, loss_fn = _make(case)
            ddp = DistributedDataParallel(model)
            results[case] = _step(model, loss_fn, images[local], texts[local], labels[local], wrapper=ddp)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """``{rank: {case: (local loss, averaged grads)}}`` from one two-process run."""
    import torch.multiprocessing as mp

    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return {rank: torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_ddp_gradients_equal_single_process_on_global_batch(ddp_results, case):
    model, loss_fn = _make(case)
    ref_loss, ref_grads = _step(model, loss_fn, *_global_batch())
    local_losses = [ddp_results[rank][case][0] for rank in range(WORLD_SIZE)]
    # The global loss is the mean of the ranks' local losses (equal local batch sizes).
    torch.testing.assert_close(torch.stack(local_losses).mean(), ref_loss, atol=1e-5, rtol=0)
    for rank in range(WORLD_SIZE):
        grads = ddp_results[rank][case][1]
        assert grads.keys() == ref_grads.keys()
        for name, ref in ref_grads.items():
            torch.testing.assert_close(grads[name], ref, atol=1e-5, rtol=0, msg=f"{case} rank {rank} {name}")
