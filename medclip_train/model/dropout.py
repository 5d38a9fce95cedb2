"""Dropout with cheaper random masks on CPU, same numerics as ``torch.nn.Dropout`` there.

On CPU, ``F.dropout`` draws its mask with ``bernoulli_``: one call of torch's Mersenne Twister per element, about
6 ns each on one core. The bench model's BERT runs nine such dropouts per step on (32, 75, 256) activations:
3.9 ms each, 4-5% of its training step (``python -m bench step``). Here one 64-bit draw of the same generator gives
eight uniform bytes; an element is kept when its byte is below ``floor(256 q)`` (``q`` = 1 - p, the keep
probability), and an element whose byte equals that threshold (1 in 256) is kept with probability
``frac(256 q)`` by a second, double-precision draw. So each element is kept with probability ``q`` exactly (to
2^-53), independently, from the same seeded generator (``torch.manual_seed``, Lightning's seeding and the
grad-cache's RNG-state restore all apply). The kept values are those of ``F.dropout`` on CPU, which multiplies by
a noise tensor ``bernoulli(q).div_(q)`` computed in the input's dtype: ``x * noise``, and ``grad * noise`` backward.

The masks are a different draw than ``bernoulli_``'s, so a run is not bit-identical to one with torch's dropout;
the distribution is the same. Off CPU (``F.dropout`` on a GPU is a fused Philox kernel) the module is torch's.
"""

from __future__ import annotations

import numpy as np
import torch

_INT64_RANGE = (-(2**63), 2**63 - 1)


def keep_mask(numel: int, keep: float, generator: torch.Generator | None = None) -> np.ndarray:
    """A bool mask of ``numel`` independent draws, each True with probability ``keep``, from torch's generator.

    numpy does the compares: torch's elementwise kernels cost 5-10x more per element on uint8 at this size.
    """
    words = torch.empty((numel + 7) // 8, dtype=torch.int64)
    words.random_(*_INT64_RANGE, generator=generator)  # the full 64 bits: random_() alone leaves the sign bit 0
    uniform_bytes = words.numpy().view(np.uint8)[:numel]
    scaled = keep * 256.0
    threshold = int(scaled)
    mask = uniform_bytes < threshold
    tie_keep = scaled - threshold
    if tie_keep > 0:
        ties = np.flatnonzero(uniform_bytes == threshold)
        if ties.size:
            second = torch.rand(ties.size, dtype=torch.float64, generator=generator)
            mask[ties] = (second < tie_keep).numpy()
    return mask


def dropout_noise(mask: np.ndarray, keep: float, dtype: torch.dtype) -> torch.Tensor:
    """``mask.to(dtype).div_(keep)`` as ``F.dropout`` computes its noise on CPU, built as integers: the uint8 ->
    bf16 conversion costs 10x an integer multiply by the bit pattern of ``1 / keep`` in ``dtype``."""
    kept = torch.from_numpy(mask.view(np.uint8))
    scale = torch.ones((), dtype=dtype).div_(keep)  # rounded to dtype exactly as F.dropout's div_
    if dtype in (torch.bfloat16, torch.float16):
        return kept.to(torch.int16).mul_(scale.view(torch.int16)).view(dtype)
    return kept.to(dtype).mul_(scale)


class CPUDropout(torch.nn.Dropout):
    """``torch.nn.Dropout`` whose CPU training masks come from :func:`keep_mask` (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and 0.0 < self.p < 1.0 and x.device.type == "cpu" and x.numel()):
            return super().forward(x)
        if self.inplace or torch.compiler.is_compiling():
            return super().forward(x)
        keep = 1.0 - self.p
        noise = dropout_noise(keep_mask(x.numel(), keep), keep, x.dtype)
        return x * noise.view(x.shape)


def use_cpu_dropout(model: torch.nn.Module) -> int:
    """Make every ``torch.nn.Dropout`` of ``model`` with ``0 < p < 1`` a :class:`CPUDropout`; returns how many.

    Its class is swapped in place: parameters, hooks and ``state_dict`` (a dropout has none) are unchanged.
    """
    swapped = 0
    for module in model.modules():
        if type(module) is torch.nn.Dropout and 0.0 < module.p < 1.0:
            module.__class__ = CPUDropout
            swapped += 1
    return swapped
