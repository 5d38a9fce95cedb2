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

Hugging Face text towers drop attention probabilities inside ``scaled_dot_product_attention``, whose CPU kernel
with dropout is torch's "math" path (fp32 scores, ``bernoulli_`` masks: 4.7 of its 21 ms per BERT layer of the
bench step). :func:`sdpa_with_cpu_dropout` is that path written out with these masks; registered with transformers'
attention interface, it replaces ``sdpa`` on CPU in training and hands every other case back to ``sdpa``.
"""

from __future__ import annotations

import math

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


def cpu_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """``F.dropout(x, p, training=True)`` on CPU with :func:`keep_mask`'s masks."""
    keep = 1.0 - p
    return x * dropout_noise(keep_mask(x.numel(), keep), keep, x.dtype).view(x.shape)


class CPUDropout(torch.nn.Dropout):
    """``torch.nn.Dropout`` whose CPU training masks come from :func:`keep_mask` (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ours = self.training and 0.0 < self.p < 1.0 and x.device.type == "cpu" and x.numel() > 0 and not self.inplace
        if not ours or torch.compiler.is_compiling():
            return super().forward(x)
        return cpu_dropout(x, self.p)


def math_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0, scale: float | None = None):
    """torch's "math" ``scaled_dot_product_attention`` on CPU, op for op (the same values and gradients: tested),
    with :func:`cpu_dropout` on the probabilities. (B, H, L, D) inputs, a bool or float mask broadcastable to the
    scores; no causal masking, no GQA (the caller checks)."""
    if torch.is_autocast_enabled("cpu"):  # the op is on autocast's lower-precision list
        low = torch.get_autocast_dtype("cpu")
        query, key, value = (t.to(low) for t in (query, key, value))
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(low)
    dtype = query.dtype
    with torch.autocast("cpu", enabled=False):
        if dtype in (torch.bfloat16, torch.float16):  # the math path computes in fp32 on CPU
            query, key, value = query.float(), key.float(), value.float()
        root = math.sqrt(scale if scale is not None else 1.0 / math.sqrt(query.shape[-1]))
        scores = (query * root) @ (key.transpose(-2, -1) * root)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros(attn_mask.shape, dtype=dtype).masked_fill_(~attn_mask, float("-inf"))
            scores = scores + attn_mask
        probs = torch._safe_softmax(scores, -1)  # a fully masked row gives zeros, as in torch's kernel
        if dropout_p > 0.0:
            probs = cpu_dropout(probs, dropout_p)
        return (probs @ value).to(dtype)


CPU_SDPA = "sdpa_cpu_dropout"


def sdpa_with_cpu_dropout(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs
):
    """transformers' ``sdpa`` attention function, with :func:`math_attention` where torch would run its math path
    with dropout on CPU; any other case (evaluation, GPU, causal, GQA, position bias) is ``sdpa`` itself."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    ours = (
        dropout > 0.0
        and query.device.type == "cpu"
        and not is_causal
        and not getattr(module, "is_causal", False)
        and getattr(module, "num_key_value_groups", 1) == 1
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
        and (attention_mask is None or attention_mask.dim() == 4)
        and not torch.compiler.is_compiling()
    )
    if not ours:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    out = math_attention(query, key, value, attention_mask, dropout, scaling)
    return out.transpose(1, 2).contiguous(), None


def _register_cpu_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CPU_SDPA, sdpa_with_cpu_dropout)
    AttentionMaskInterface.register(CPU_SDPA, sdpa_mask)  # without it, transformers would build no padding mask


def use_cpu_dropout(model: torch.nn.Module) -> int:
    """Make every ``torch.nn.Dropout`` of ``model`` with ``0 < p < 1`` a :class:`CPUDropout`, and every Hugging Face
    model in it with ``sdpa`` attention use :func:`sdpa_with_cpu_dropout`; returns how many of both.

    A dropout's class is swapped in place: parameters, hooks and ``state_dict`` (a dropout has none) are unchanged;
    the attention switch changes only the running model's config (exports read the tower's config from its source).
    """
    swapped = 0
    for module in model.modules():
        if type(module) is torch.nn.Dropout and 0.0 < module.p < 1.0:
            module.__class__ = CPUDropout
            swapped += 1
        config = getattr(module, "config", None)
        if getattr(config, "_attn_implementation", None) == "sdpa" and hasattr(module, "set_attn_implementation"):
            _register_cpu_sdpa()
            module.set_attn_implementation(CPU_SDPA)
            swapped += 1
    return swapped
