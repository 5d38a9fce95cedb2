"""The model's training step alone (no loader, no Lightning), with and without each compute optimisation.

``python -m bench step`` times forward + loss + backward + clipping + AdamW of the bench model (preset
``bench_cpu_vit_tiny_bert_mini``, batch 32, 224 px, text length 75 = the mean trimmed batch length, bf16 autocast)
on random inputs, once per variant, each in a fresh process, variants alternating over ``--repeats``:

* ``default``: what ``train.py`` does on CPU: timm's explicit attention, ``CPUDropout`` masks, fused AdamW;
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
  ``config.json`` says 0; timm's ViT has no dropout by default). Not the reference's numerics;
* ``torch-dropout``: torch's ``nn.Dropout`` masks (``bernoulli_``) instead of ``CPUDropout``'s
  (medclip_train/model/dropout.py): what the step did before.

``--paired`` runs each variant and ``default`` in one process with their steps interleaved, and reports the ratio
of their median steps: this machine's 10-15% drift between runs hides effects of a few percent, which pairing
resolves (``default`` paired with a second copy of itself measures the method's own noise).

It isolates the compute from the data pipeline: the gap between this rate and ``python -m bench train``'s is what
the loader worker and Lightning cost.

``--device cuda`` times the step on the GPU (``torch.cuda.synchronize`` after each step) as ``train.py`` runs it
there: timm's fused attention and torch's dropout kept, so ``sdpa`` and ``torch-dropout`` are ``default`` and are
refused. ``--preset``, ``--text-model``, ``--batch-size`` and ``--text-length`` choose the model and inputs (on a
GPU: the BiomedCLIP preset with ``builtin:pubmedbert-base`` at batch 256, text length 80 = ``bench gpu``'s mean
trimmed length); ``--tokenizer`` a tokenizer folder instead of the bench data's (written first when missing; the
step needs no images).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from bench.common import (
    ensure_bench_data,
    gpu_matmul_rates,
    machine_info,
    markdown_table,
    matmul_rates,
    mean,
    refuse_slow_bf16,
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
    "torch-dropout",
)
PRESET, BATCH, TEXT_LENGTH = "bench_cpu_vit_tiny_bert_mini", 32, 75
CPU_ONLY = ("sdpa", "torch-dropout")  # CPU changes of the default step; on CUDA these are the default


def build_step(variant: str, setup: dict):
    """The model, inputs and one training step of ``variant``, each from the same seed (same initial weights).

    ``setup``: ``device``, ``preset``, ``text_model``, ``batch``, ``text_length``, ``tokenizer`` (see ``main``).
    """
    import torch

    from medclip_train.config import ModelConfig
    from medclip_train.losses import ContrastiveLoss
    from medclip_train.model.dropout import use_cpu_dropout
    from medclip_train.model.factory import build_model, set_fused_attention
    from medclip_train.presets import get_preset

    device, preset, batch = setup["device"], setup["preset"], setup["batch"]
    torch.manual_seed(0)
    text_model = _no_dropout_text_config(setup) if variant == "text-dropout-0" else setup.get("text_model")
    config = ModelConfig(preset=preset, tokenizer=setup["tokenizer"], text_model=text_model)
    model = build_model(config).model.train().to(device)
    if device == "cpu":  # what CLIPModule.on_fit_start does on CPU
        set_fused_attention(model, variant == "sdpa")
        if variant != "torch-dropout":
            use_cpu_dropout(model)
    size = get_preset(preset)["model_cfg"]["vision_cfg"]["image_size"]
    images = torch.randn(batch, 3, size, size, device=device)
    text = torch.randint(5, 500, (batch, setup["text_length"]), device=device)
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
        with torch.autocast(device, dtype=torch.bfloat16, enabled=not pure):
            f = forward(images, text)
            loss = loss_fn(f)["loss"]
            if variant == "backward-under-autocast":
                loss.backward()
        if variant != "backward-under-autocast":
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":  # the host clock times the GPU's work, not the queueing of it
            torch.cuda.synchronize()

    return step


def _timed(step) -> float:
    t = time.perf_counter()
    step()
    return time.perf_counter() - t


def child(variant: str, setup: dict, steps: int, warmup: int) -> dict:
    step = build_step(variant, setup)
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    first = time.perf_counter() - t0
    median = _median([_timed(step) for _ in range(steps)])
    return {"median_step_s": median, "warmup_s": first, "samples_per_s": setup["batch"] / median}


def paired_child(variant: str, setup: dict, steps: int, warmup: int) -> dict:
    """``default`` and ``variant`` in one process, their steps interleaved (ABBA order), so that both see the same
    machine: this virtual machine's speed drifts by 10-15% between runs minutes apart, more than most variants
    change, while two models stepped in turn differ by 0.2% when they are the same (``--variants default``)."""
    other = variant if variant != "default" else "default (second copy)"
    steps_of = {"default": build_step("default", setup), other: build_step(variant, setup)}
    names = list(steps_of)
    for _ in range(warmup):
        for name in names:
            steps_of[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(steps):
        for name in names if i % 2 == 0 else names[::-1]:
            times[name].append(_timed(steps_of[name]))
    base, other = (_median(times[name]) for name in names)
    return {
        "samples_per_s": setup["batch"] / other,
        "default_samples_per_s": setup["batch"] / base,
        "vs_default": base / other,
        "median_step_s": other,
    }


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _no_dropout_text_config(setup: dict) -> str:
    """A copy of the preset's text tower config with both BERT dropouts at 0 (a folder for ``text_model``)."""
    import tempfile
    from pathlib import Path

    from medclip_train.presets import get_preset, resolve_hf_name

    name = setup.get("text_model") or get_preset(setup["preset"])["model_cfg"]["text_cfg"]["hf_model_name"]
    source = Path(resolve_hf_name(name))
    config = json.loads((source / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    folder = Path(tempfile.mkdtemp(prefix="bench_text_dropout0_"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return str(folder)


def main(argv: list[str]) -> None:
    if argv[:1] in (["--child"], ["--paired-child"]):
        variant, setup, steps, warmup = argv[1], json.loads(argv[2]), int(argv[3]), int(argv[4])
        measure = child if argv[0] == "--child" else paired_child
        print("RESULT " + json.dumps(measure(variant, setup, steps, warmup)))
        return
    p = argparse.ArgumentParser(prog="python -m bench step", description=__doc__.splitlines()[0])
    cpu_only = ", ".join(CPU_ONLY)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, help=f"default: all (on CUDA all but {cpu_only})")
    p.add_argument("--paired", action="store_true", help="each variant interleaved with default in one process")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run (the median is reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quiet-wait", type=float, default=30.0)
    p.add_argument("--name", default="step")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--preset", default=PRESET)
    p.add_argument("--text-model", help="text tower (default: the preset's; builtin:NAME needs no download)")
    p.add_argument("--batch-size", type=int, default=BATCH)
    p.add_argument("--text-length", type=int, default=TEXT_LENGTH, help="tokens per caption (random ids)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the bench data's)")
    a = p.parse_args(argv)
    cuda = a.device == "cuda"
    if a.variants is None:
        a.variants = [v for v in VARIANTS if not (cuda and v in CPU_ONLY)]
    if cuda and set(a.variants) & set(CPU_ONLY):
        p.error(f"--variants {' '.join(sorted(set(a.variants) & set(CPU_ONLY)))}: on CUDA these are the default step")
    if not cuda:
        refuse_slow_bf16("python -m bench step")
    tokenizer = a.tokenizer or ensure_bench_data()["tokenizer"]
    setup = {"device": a.device, "preset": a.preset, "text_model": a.text_model, "tokenizer": tokenizer}
    setup.update(batch=a.batch_size, text_length=a.text_length)
    machine = machine_info()
    wait_for_quiet(a.quiet_wait)
    rates = gpu_matmul_rates() if cuda else matmul_rates()
    runs: dict[str, list] = {v: [] for v in a.variants}
    mode = "--paired-child" if a.paired else "--child"
    for _ in range(a.repeats):
        for v in a.variants:
            wait_for_quiet(a.quiet_wait)
            cmd = [sys.executable, "-m", "bench", "step", mode, v, json.dumps(setup), str(a.steps), str(a.warmup)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                raise RuntimeError(f"variant {v} failed:\n{out.stderr[-3000:]}")
            runs[v].append(json.loads(lines[-1].removeprefix("RESULT ")))
            print(f"[bench] {v}: {runs[v][-1]['samples_per_s']:.2f} samples/s", flush=True)
    table = _paired_table(runs) if a.paired else _table(runs, a.variants[0])
    table += f"\n\nmatmul peak: bf16 {rates['bf16']:.0f} GFLOP/s, fp32 {rates['fp32']:.0f} GFLOP/s"
    print(table)
    result = {"machine": machine, "command": "python -m bench step " + " ".join(argv), "settings": vars(a)}
    result.update({"matmul_gflops": rates, "runs": runs, "table": table})
    print(f"[bench] wrote {write_result(a.name, result)}")


def _table(runs: dict[str, list], base_variant: str) -> str:
    base = mean([r["samples_per_s"] for r in runs[base_variant]])
    rows = [
        [
            v,
            " / ".join(f"{r['samples_per_s']:.1f}" for r in results),
            mean([r["samples_per_s"] for r in results]),
            f"{mean([r['samples_per_s'] for r in results]) / base:.2f}x",
            round(mean([r["warmup_s"] for r in results]), 1),
        ]
        for v, results in runs.items()
    ]
    headers = ["variant", "samples/s per run", "mean samples/s", f"vs {base_variant}", "first steps s"]
    return markdown_table(headers, rows)


def _paired_table(runs: dict[str, list]) -> str:
    rows = [
        [
            v if v != "default" else "default (two copies: the method's noise)",
            " / ".join(f"{r['samples_per_s']:.1f}" for r in results),
            " / ".join(f"{r['default_samples_per_s']:.1f}" for r in results),
            " / ".join(f"{r['vs_default']:.3f}" for r in results),
            f"{mean([r['vs_default'] for r in results]):.3f}x",
        ]
        for v, results in runs.items()
    ]
    headers = ["variant", "samples/s per run", "default in the same runs", "vs default per run", "mean vs default"]
    return markdown_table(headers, rows)
