"""The model's training step alone (no loader, no Lightning), with and without each compute optimisation.

``python -m bench step`` times forward + loss + backward + clipping + AdamW of the bench model (preset
``bench_cpu_vit_tiny_bert_mini``, batch 32, 224 px, text length 75 = the mean trimmed batch length, bf16 autocast)
on random inputs, once per variant, each in a fresh process, variants alternating over ``--repeats``:

* ``default``: what ``train.py`` does on CPU: timm's explicit attention, fused AdamW;
* ``sdpa``: timm's fused scaled-dot-product attention instead;
* ``foreach-adamw``: AdamW with ``foreach=True`` instead of ``fused=True``;
* ``channels-last``: model and images in channels-last memory format;
* ``compile``: ``torch.compile`` (inductor, default mode) of the model's forward;
* ``backward-under-autocast``: ``loss.backward()`` inside the autocast block (what Lightning's precision context
  did to the module's manual backward before ``CLIPModule._backward`` switched autocast off for it).

It isolates the compute from the data pipeline: the gap between this rate and ``python -m bench train``'s is what
the loader worker and Lightning cost.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from bench.common import (
    ensure_bench_data,
    machine_info,
    markdown_table,
    matmul_rates,
    mean,
    wait_for_quiet,
    write_result,
)

VARIANTS = ("default", "sdpa", "foreach-adamw", "channels-last", "compile", "backward-under-autocast")
PRESET, BATCH, TEXT_LENGTH = "bench_cpu_vit_tiny_bert_mini", 32, 75


def child(variant: str, tokenizer: str, steps: int, warmup: int) -> dict:
    import torch

    from medclip_train.config import ModelConfig
    from medclip_train.losses import ContrastiveLoss
    from medclip_train.model.factory import build_model, set_fused_attention

    torch.manual_seed(0)
    model = build_model(ModelConfig(preset=PRESET, tokenizer=tokenizer)).model.train()
    set_fused_attention(model, variant == "sdpa")
    images = torch.randn(BATCH, 3, 224, 224)
    text = torch.randint(5, 500, (BATCH, TEXT_LENGTH))
    if variant == "channels-last":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    adamw = {"foreach": True} if variant == "foreach-adamw" else {"fused": True}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **adamw)
    forward = torch.compile(model) if variant == "compile" else model
    loss_fn = ContrastiveLoss()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            f = forward(images, text)
            loss = loss_fn(f)["loss"]
            if variant == "backward-under-autocast":
                loss.backward()
        if variant != "backward-under-autocast":
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    times.sort()
    return {"median_step_s": times[len(times) // 2], "warmup_s": first, "samples_per_s": BATCH / times[len(times) // 2]}


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        variant, tokenizer, steps, warmup = argv[1], argv[2], int(argv[3]), int(argv[4])
        print("RESULT " + json.dumps(child(variant, tokenizer, steps, warmup)))
        return
    p = argparse.ArgumentParser(prog="python -m bench step", description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--steps", type=int, default=10, help="timed steps per run (the median is reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quiet-wait", type=float, default=30.0)
    p.add_argument("--name", default="step")
    a = p.parse_args(argv)
    data = ensure_bench_data()
    machine = machine_info()
    wait_for_quiet(a.quiet_wait)
    rates = matmul_rates()
    runs: dict[str, list] = {v: [] for v in a.variants}
    for _ in range(a.repeats):
        for v in a.variants:
            wait_for_quiet(a.quiet_wait)
            cmd = [sys.executable, "-m", "bench", "step", "--child", v, data["tokenizer"], str(a.steps), str(a.warmup)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                raise RuntimeError(f"variant {v} failed:\n{out.stderr[-3000:]}")
            runs[v].append(json.loads(lines[-1].removeprefix("RESULT ")))
            print(f"[bench] {v}: {runs[v][-1]['samples_per_s']:.2f} samples/s", flush=True)
    base = mean([r["samples_per_s"] for r in runs[a.variants[0]]])
    rows = [
        [
            v,
            " / ".join(f"{r['samples_per_s']:.1f}" for r in runs[v]),
            mean([r["samples_per_s"] for r in runs[v]]),
            f"{mean([r['samples_per_s'] for r in runs[v]]) / base:.2f}x",
            round(mean([r["warmup_s"] for r in runs[v]]), 1),
        ]
        for v in a.variants
    ]
    table = markdown_table(
        ["variant", "samples/s per run", "mean samples/s", f"vs {a.variants[0]}", "first steps s"], rows
    )
    table += f"\n\nmatmul peak: bf16 {rates['bf16']:.0f} GFLOP/s, fp32 {rates['fp32']:.0f} GFLOP/s"
    print(table)
    result = {"machine": machine, "command": "python -m bench step " + " ".join(argv), "settings": vars(a)}
    result.update({"matmul_gflops": rates, "runs": runs, "table": table})
    print(f"[bench] wrote {write_result(a.name, result)}")
