"""Whether this CPU multiplies bf16 fast: a bf16 run on one that does not is silently 100x slower.

CPUs with AVX512-BF16 or AMX run a bf16 ``torch.mm`` about 4x faster than fp32; AVX2-only CPUs have no bf16 kernel
and fall back to a scalar path (measured on an AVX2 EPYC: bf16 1.1 GFLOP/s, fp32 167). Nothing in torch or
Lightning says so, so a ``trainer.precision=bf16-mixed`` run there just crawls. Torch's reported CPU capability
("AVX2", "AVX512") does not tell AVX512 with BF16 from AVX512 without it, hence a timed probe.
"""

from __future__ import annotations

import time

import torch

# bf16 below this fraction of the fp32 rate is an emulated path, not a slower kernel: AVX512 without BF16 runs
# bf16 through oneDNN's conversions at about fp32's rate, AVX2 at under 1% of it.
SLOW_BF16_FRACTION = 0.25


def matmul_gflops(dtype: torch.dtype, n: int = 256, repeats: int = 3, seconds: float = 0.05) -> float:
    """The fastest of at least ``repeats`` timed ``torch.mm`` of two n x n matrices on the CPU (more until ``seconds``
    have passed, so that a busy machine's preemptions miss some), in GFLOP/s; one untimed product first."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    threads = torch.get_num_threads()
    # One thread: the bf16/fp32 ratio is the same, and on a loaded machine a multi-threaded product waits at its
    # barrier for a preempted thread (fp32 measured 2 instead of 140 GFLOP/s beside another job).
    torch.set_num_threads(1)
    try:
        torch.mm(a, b)
        best, count, end = float("inf"), 0, time.perf_counter() + seconds
        while count < repeats or time.perf_counter() < end:
            start = time.perf_counter()
            torch.mm(a, b)
            best, count = min(best, time.perf_counter() - start), count + 1
    finally:
        torch.set_num_threads(threads)
    return 2 * n**3 / max(best, 1e-9) / 1e9


def bf16_is_emulated(bf16_gflops: float, fp32_gflops: float) -> bool:
    """Whether these two measured ``torch.mm`` rates are those of a CPU without a bf16 kernel."""
    return bf16_gflops < SLOW_BF16_FRACTION * fp32_gflops


def slow_bf16_message(precision: str, bf16_gflops: float, fp32_gflops: float) -> str | None:
    """The warning for a bf16 ``precision`` on a CPU whose bf16 matmul is an emulation; None when it is not."""
    if not str(precision).startswith("bf16") or not bf16_is_emulated(bf16_gflops, fp32_gflops):
        return None
    return (
        f"trainer.precision={precision} on a CPU without a fast bf16 matmul: torch.mm runs at {bf16_gflops:.1f} "
        f"GFLOP/s in bf16 against {fp32_gflops:.0f} in fp32 here (torch's CPU capability: "
        f"{torch.backends.cpu.get_cpu_capability()}), so this run's matmuls are about "
        f"{fp32_gflops / bf16_gflops:.0f}x slower than with trainer.precision=32-true"
    )


def cpu_bf16_warning(precision: str) -> str | None:
    """``slow_bf16_message`` for this CPU, probed only when ``precision`` is a bf16 one (0.1-0.2 s)."""
    if not str(precision).startswith("bf16"):
        return None
    return slow_bf16_message(precision, matmul_gflops(torch.bfloat16), matmul_gflops(torch.float32))
