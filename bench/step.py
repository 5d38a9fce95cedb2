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
  did to the module's manual backward before ``CLIPModule._backward`` switched autocast off for it);
* ``pure-bf16``: parameters, gradients, AdamW moments and activations in bf16, no autocast (``train.py fit
  --trainer.precision bf16-true``; open_clip's ``--precision pure_bf16``): no casts, half the optimizer traffic;
* ``compile-towers``: ``torch.compile`` of the image and the text tower separately (the loss stays eager);
* ``compile-loss``: ``torch.compile`` of the contrastive loss only;
* ``text-dropout-0``: the text tower with ``hidden_dropout_prob`` and ``attention_probs_dropout_prob`` 0 (the bench
  model's BERT, like PubMedBERT, has 0.1; users choose it with ``--model.clip.text_model FOLDER`` whose
  ``config.json`` says 0; timm's ViT has no dropout by default). Not the reference's numerics.

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

VARIANTS = (
    "default",
    "sdpa",
    "foreach-adamw",
    "channels-last",
    "compile",
    "backward-under-autocast",
    "pure-bf16",
    "compile-towers",
    "compile-loss",
    "text-dropout-0",
)
PRESET, BATCH, TEXT_LENGTH = "bench_cpu_vit_tiny_bert_mini", 32, 75


def child(variant: str, tokenizer: str, steps: int, warmup: int) -> dict:
    import torch

    from medclip_train.config import ModelConfig
    from medclip_train.losses import ContrastiveLoss
    from medclip_train.model.factory import build_model, set_fused_attention

    torch.manual_seed(0)
    text_model = _no_dropout_text_config() if variant == "text-dropout-0" else None
    model = build_model(ModelConfig(preset=PRESET, tokenizer=tokenizer, text_model=text_model)).model.train()
    set_fused_attention(model, variant == "sdpa")
    images = torch.randn(BATCH, 3, 224, 224)
    text = torch.randint(5, 500, (BATCH, TEXT_LENGTH))
    if variant == "channels-last":
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    pure = variant == "pure-bf16"
    if pure:  # what Lightning's bf16-true does to the module and its float inputs
        model, images = model.to(torch.bfloat16), images.to(torch.bfloat16)
    adamw = {"foreach": True} if variant == "foreach-adamw" else {"fused": True}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **adamw)
    if variant == "compile-towers":
        model.visual, model.text = torch.compile(model.visual), torch.compile(model.text)
    forward = torch.compile(model) if variant == "compile" else model
    loss_fn = torch.compile(ContrastiveLoss()) if variant == "compile-loss" else ContrastiveLoss()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not pure):
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


def _no_dropout_text_config() -> str:
    """A copy of the preset's text tower config with both BERT dropouts at 0 (a folder for ``text_model``)."""
    import tempfile
    from pathlib import Path

    from medclip_train.presets import get_preset, resolve_hf_name

    source = Path(resolve_hf_name(get_preset(PRESET)["model_cfg"]["text_cfg"]["hf_model_name"]))
    config = json.loads((source / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    folder = Path(tempfile.mkdtemp(prefix="bench_text_dropout0_"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return str(folder)


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
