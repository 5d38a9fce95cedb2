"""Training throughput: this project's loop against ``open_clip_train.main`` on the same shards and model.

``python -m bench train`` runs, alternately, ``train.py fit --config configs/bench_cpu.yaml`` (ours) and
open_clip_train (theirs, in the anchor venv, see README.md), both with vit_tiny at 224 px + the 4-layer 256-wide
BERT (context 128, embed 256), batch 32, bf16 autocast, one loader worker. open_clip runs with the settings its
users train with (``--local-loss --gather-with-grad``, its default logging interval of 100 steps). Both sides report
the median step rate of the steps after the first ``--warmup``, measured the same way: the time from the end of one
step to the end of the next (ours: a callback's host clock; theirs: the per-step batch time open_clip measures
itself, ``batch_time_m``, whose interval means it logs as ``Batch (t)``, kept per step by bench/_anchor.py). An
independent figure next to them: a plain ``python -m open_clip_train.main --model local-dir:DIR`` started as a user
would, its median taken over its own logged per-interval ``Batch (t)``. MFU divides model FLOPs/s by the peak
``torch.mm`` rate measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

import lightning as L

from bench.common import (
    DEFAULT_ANCHOR_PYTHON,
    REPO_ROOT,
    RESULTS_DIR,
    alternate,
    bench_env,
    check_anchor_python,
    ensure_bench_data,
    machine_info,
    markdown_table,
    matmul_rates,
    mean,
    refuse_slow_bf16,
    run_logged,
    wait_for_quiet,
    write_result,
)

PRESET = "bench_cpu_vit_tiny_bert_mini"
CONFIG = "configs/bench_cpu.yaml"
BATCH_SIZE = 32
_OPEN_CLIP_STEP = re.compile(r"Train Epoch: \d+ \[\s*(\d+)/\d+.*?Batch \(t\): ([0-9.]+)")
OPEN_CLIP_USUAL = ["--local-loss", "--gather-with-grad"]
"""What open_clip's README trains with; on one process they change nothing, but they are its users' settings."""


class StepTimes(L.Callback):
    """Writes the host clock at the end of every training step to ``path`` (JSON) when the fit ends.

    On CUDA it also counts the host syncs of each step (``torch.cuda.set_sync_debug_mode("warn")`` warns once per
    synchronising call) into ``cuda_syncs.json`` next to it: a sync stalls the host until the GPU queue drains.
    """

    def __init__(self, path: str):
        self.path = path
        self.times: list[float] = []
        self.syncs: list[int] = []
        self._count = 0
        self._cuda = False

    def on_train_start(self, trainer, pl_module) -> None:
        # Remembered here: by on_fit_end, Lightning's single-device teardown has moved the module to the CPU.
        self._cuda = pl_module.device.type == "cuda"
        if not self._cuda:
            return
        import warnings

        import torch

        warnings.filterwarnings("always", message=r".*synchroniz.*")
        shown = warnings.showwarning

        def count(message, category, *args, **kwargs):
            if "synchroniz" in str(message):
                self._count += 1
                return
            shown(message, category, *args, **kwargs)

        warnings.showwarning = count
        torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter())
        self.syncs.append(self._count)
        self._count = 0

    def on_fit_end(self, trainer, pl_module) -> None:
        Path(self.path).write_text(json.dumps(self.times))
        if self._cuda:
            Path(self.path).with_name("cuda_syncs.json").write_text(json.dumps(self.syncs))


def steady_rate(step_times: list[float], warmup: int, batch_size: int = BATCH_SIZE) -> float | None:
    """Samples/s from the end of step ``warmup`` to the end of the last step."""
    if len(step_times) < warmup + 2:
        return None
    return batch_size * (len(step_times) - 1 - warmup) / (step_times[-1] - step_times[warmup])


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def median_rate(durations: list[float], batch_size: int = BATCH_SIZE) -> float | None:
    """Samples/s of the median step, from per-step durations (seconds)."""
    return batch_size / median(durations) if durations else None


def logged_windows(log_text: str, batch_size: int) -> list[tuple[int, int, float]]:
    """open_clip's log lines as (first step, last step, mean batch time) of each logging interval: each line's
    ``Batch (t)`` is the mean per-step time since the line before (its meters are reset after every line)."""
    windows, last = [], 0
    for n_samples, t in _OPEN_CLIP_STEP.findall(log_text):
        step = int(n_samples) // batch_size
        windows.append((last + 1, step, float(t)))
        last = step
    return windows


# ---- model: open_clip config and FLOPs -----------------------------------------------------------------------------
def open_clip_model_json(tokenizer: str, folder: Path, preset: str = PRESET, text_model: str | None = None) -> Path:
    """The preset as an open_clip model config file (stem = model name), absolute paths for the HF parts."""
    from medclip_train.presets import get_preset, resolve_hf_name

    cfg = get_preset(preset)["model_cfg"]
    text = text_model or cfg["text_cfg"]["hf_model_name"]
    cfg["text_cfg"]["hf_model_name"] = str(Path(resolve_hf_name(text)).resolve())
    cfg["text_cfg"]["hf_tokenizer_name"] = str(Path(tokenizer).resolve())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{preset.replace('_', '-')}.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def mean_batch_text_length(
    shards: str, tokenizer: str, context_length: int = 128, draws: int = 200, batch_size: int = BATCH_SIZE
) -> float:
    """Mean over random batches of ``batch_size`` captions of the longest one in tokens (what trimming leaves)."""
    import random
    import tarfile

    from open_clip.tokenizer import HFTokenizer
    from webdataset.shardlists import expand_urls

    captions = []
    for url in expand_urls(shards):
        with tarfile.open(url) as tf:
            captions += [tf.extractfile(m).read().decode() for m in tf.getmembers() if m.name.endswith(".txt")]
    lengths = (HFTokenizer(tokenizer, context_length=context_length)(captions) != 0).sum(dim=1).tolist()
    rng = random.Random(0)
    return mean([max(rng.sample(lengths, min(batch_size, len(lengths)))) for _ in range(draws)])


def flops_per_sample(
    tokenizer: str,
    text_lengths: list[int],
    preset: str = PRESET,
    text_model: str | None = None,
    batch_size: int = BATCH_SIZE,
    device: str = "cpu",
) -> dict[int, float]:
    """Forward+backward FLOPs of the model and loss per sample at ``batch_size``, per text length (FlopCounterMode).

    Attention is counted through SDPA's math path, since the counter has no formula for the CPU flash kernel.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from medclip_train.config import ModelConfig
    from medclip_train.losses import ContrastiveLoss
    from medclip_train.model.factory import build_model

    built = build_model(ModelConfig(preset=preset, tokenizer=tokenizer, text_model=text_model))
    model, size = built.model.train().to(device), built.model_cfg["vision_cfg"]["image_size"]
    loss_fn = ContrastiveLoss()
    out = {}
    for length in text_lengths:
        images = torch.randn(batch_size, 3, size, size, device=device)
        text = torch.randint(5, 500, (batch_size, length), device=device)
        counter = FlopCounterMode(display=False)
        with counter, sdpa_kernel(SDPBackend.MATH):
            features = model(images, text)
            loss_fn(features)["loss"].backward()
        out[length] = counter.get_total_flops() / batch_size
        model.zero_grad(set_to_none=True)
    return out


# ---- the two sides -------------------------------------------------------------------------------------------------
def _flags(flags: dict) -> list[str]:
    return [str(x) for kv in flags.items() for x in kv]


def run_ours(
    data: dict,
    steps: int,
    warmup: int,
    run_dir: Path,
    extra: list[str],
    env: dict | None = None,
    batch_size: int = BATCH_SIZE,
) -> dict:
    times_path = run_dir / "step_times.json"
    callbacks = [{"class_path": "bench.train.StepTimes", "init_args": {"path": str(times_path)}}]
    flags = {
        "--config": CONFIG,
        "--model.clip.tokenizer": data["tokenizer"],
        "--data.train": json.dumps([{"shards": data["shards"]}]),
        "--trainer.max_steps": steps,
        "--trainer.default_root_dir": run_dir,
        "--trainer.callbacks": json.dumps(callbacks),
    }
    cmd = [sys.executable, "train.py", "fit", *_flags(flags), *extra]
    proc = run_logged(cmd, run_dir / "log.txt", env=bench_env(**(env or {})))
    if proc["rc"] != 0 or not times_path.exists():
        raise RuntimeError(f"our training run failed (exit {proc['rc']}); see {run_dir / 'log.txt'}")
    summary = json.loads((run_dir / "summary.json").read_text())
    syncs_path = run_dir / "cuda_syncs.json"
    syncs = json.loads(syncs_path.read_text())[warmup:] if syncs_path.exists() else []
    times = json.loads(times_path.read_text())
    durations = [b - a for a, b in zip(times[warmup:], times[warmup + 1 :])]  # steps warmup+1 .. last
    return {
        "cuda_syncs_per_step": sorted(syncs)[len(syncs) // 2] if syncs else None,
        "samples_per_s": median_rate(durations, batch_size),
        "steady_mean_samples_per_s": steady_rate(times, warmup, batch_size),
        "summary_steady_samples_per_s": summary.get("steady_samples_per_s"),
        "final_loss": summary.get("final_loss"),
        **proc,
    }


# --precision: ours (trainer.precision) and open_clip's (--precision) for the same numerics.
PRECISIONS = {"bf16": ("bf16-mixed", "amp_bf16"), "fp32": ("32-true", "fp32")}


def open_clip_flags(
    data: dict, steps: int, model_name: str, run_dir: Path, batch_size: int = BATCH_SIZE, precision: str = "bf16"
) -> dict:
    """open_clip_train flags for the settings of configs/bench_cpu.yaml (optimiser, schedule, clipping, no eval)."""
    return {
        "--train-data": data["shards"],
        "--train-num-samples": steps * batch_size,
        "--dataset-type": "webdataset",
        "--batch-size": batch_size,
        "--precision": PRECISIONS[precision][1],
        "--workers": 1,
        "--epochs": 1,
        "--model": model_name,
        "--device": "cpu",
        "--lr": 5e-4,
        "--wd": 0.2,
        "--warmup": 10,
        "--beta1": 0.9,
        "--beta2": 0.98,
        "--eps": 1e-6,
        "--grad-clip-norm": 1.0,
        "--seed": 0,
        "--report-to": "",
        "--save-frequency": 0,
        "--zeroshot-frequency": 0,
        "--val-frequency": 0,
        "--logs": run_dir.parent,
        "--name": run_dir.name,
    }


def run_theirs(
    data: dict,
    steps: int,
    warmup: int,
    run_dir: Path,
    anchor_python: str,
    model_json: Path,
    batch_size: int = BATCH_SIZE,
    overrides: dict | None = None,
    extra: list[str] = (),
    precision: str = "bf16",
) -> dict:
    """open_clip_train on the bench shards, its logging interval left at its default; ``overrides`` replace flags
    of ``open_clip_flags``, ``extra`` are appended (switches such as ``--dataset-resampled``)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)  # open_clip refuses to reuse an experiment folder
    flags = {**open_clip_flags(data, steps, model_json.stem, run_dir, batch_size, precision), **(overrides or {})}
    times_path = run_dir.parent / f"{run_dir.name}.step_times.json"
    times_path.unlink(missing_ok=True)
    cmd = [anchor_python, str(REPO_ROOT / "bench" / "_anchor.py"), "train", str(model_json)]
    cmd += ["--step-times", str(times_path), "--", *_flags(flags), *OPEN_CLIP_USUAL, *extra]
    log = run_dir.parent / f"{run_dir.name}.log"
    proc = run_logged(cmd, log, env=bench_env(PYTHONPATH=""))
    batch_times = json.loads(times_path.read_text()) if times_path.exists() else []
    if proc["rc"] != 0 or len(batch_times) < warmup + 2:
        raise RuntimeError(f"open_clip run failed (exit {proc['rc']}, {len(batch_times)} steps timed); see {log}")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # its end-of-epoch checkpoint is not needed
    steady = batch_times[warmup:]  # steps warmup+1 .. last
    return {
        "samples_per_s": median_rate(steady, batch_size),
        "steady_mean_samples_per_s": batch_size * len(steady) / sum(steady),
        "logged_windows": logged_windows(log.read_text(), batch_size),
        **proc,
    }


def run_independent(
    data: dict,
    steps: int,
    warmup: int,
    run_dir: Path,
    anchor_python: str,
    model_json: Path,
    log_every: int,
    batch_size: int = BATCH_SIZE,
    precision: str = "bf16",
) -> dict:
    """``python -m open_clip_train.main`` from the command line, as a user runs it (no wrapper; the model is a
    ``local-dir:`` folder), logging every ``log_every`` steps: the median over its logged intervals that start after
    step ``warmup`` of ``batch_size / Batch (t)``."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    model_dir = run_dir.parent / "open_clip_local_dir"
    if not (model_dir / "open_clip_config.json").exists():
        prep = [anchor_python, str(REPO_ROOT / "bench" / "_anchor.py"), "local-dir", str(model_json), str(model_dir)]
        made = run_logged(prep, run_dir.parent / "open_clip_local_dir.log", env=bench_env(PYTHONPATH=""))
        if made["rc"] != 0:
            raise RuntimeError(f"could not write {model_dir}; see {run_dir.parent / 'open_clip_local_dir.log'}")
    flags = open_clip_flags(data, steps, f"local-dir:{model_dir}", run_dir, batch_size, precision)
    flags["--log-every-n-steps"] = log_every
    cmd = [anchor_python, "-m", "open_clip_train.main", *_flags(flags), *OPEN_CLIP_USUAL]
    log = run_dir.parent / f"{run_dir.name}.log"
    proc = run_logged(cmd, log, env=bench_env(PYTHONPATH=""))
    windows = [w for w in logged_windows(log.read_text(), batch_size) if w[0] > warmup]
    if proc["rc"] != 0 or not windows:
        raise RuntimeError(f"open_clip_train.main failed (exit {proc['rc']}, no interval after warmup); see {log}")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return {
        "samples_per_s": median([batch_size / t for _, _, t in windows]),
        "steady_mean_samples_per_s": batch_size
        * sum(b - a + 1 for a, b, _ in windows)
        / sum((b - a + 1) * t for a, b, t in windows),
        "logged_windows": windows,
        "command": shlex.join(cmd),
        **proc,
    }


# ---- report --------------------------------------------------------------------------------------------------------
def summarise(runs: dict, flops: dict, rates: dict, precision: str = "bf16") -> tuple[list[list], dict]:
    """Per side: the mean over runs of each run's median-step samples/s, MFU (useful FLOPs: at the trimmed text
    length, for every side), HFU (the FLOPs each side executes: open_clip pads every caption to 128 tokens) against
    the matmul rate of ``precision``, peak memory, foreign load. An fp32 run has no bf16 columns."""
    rows, sides = [], {}
    labels = (
        ("ours", "medclip-train", flops["trimmed"]),
        ("theirs", "open_clip 3.3 (bench/_anchor.py)", flops[128]),
        ("independent", "open_clip 3.3 (python -m open_clip_train.main)", flops[128]),
    )
    for side, label, executed in labels:
        if not runs.get(side):
            continue
        sps = mean([r["samples_per_s"] for r in runs[side]])
        s = {
            "samples_per_s": sps,
            "mfu_bf16": sps * flops["trimmed"] / (rates["bf16"] * 1e9),
            "mfu_fp32": sps * flops["trimmed"] / (rates["fp32"] * 1e9),
            f"hfu_{precision}": sps * executed / (rates[precision] * 1e9),
            "peak_pss_mb": max(r["peak_pss_mb"] for r in runs[side]),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[side]),
        }
        sides[side] = s
        rows.append(
            [
                label,
                " / ".join(f"{r['samples_per_s']:.1f}" for r in runs[side]),
                sps,
                " / ".join(f"{r['steady_mean_samples_per_s']:.1f}" for r in runs[side]),
                *([f"{100 * s['mfu_bf16']:.0f}%"] if precision == "bf16" else []),
                f"{100 * s['mfu_fp32']:.0f}%",
                f"{100 * s[f'hfu_{precision}']:.0f}%",
                round(s["peak_pss_mb"]),
                round(s["peak_rss_mb"]),
                " / ".join(f"{r['foreign_cores']:.2f}" for r in runs[side]),
            ]
        )
    if "theirs" in sides and "ours" in sides:
        sides["ratio"] = sides["ours"]["samples_per_s"] / sides["theirs"]["samples_per_s"]
    if "independent" in sides and "ours" in sides:
        sides["ratio_independent"] = sides["ours"]["samples_per_s"] / sides["independent"]["samples_per_s"]
    return rows, sides


def headers(precision: str = "bf16") -> list[str]:
    mfu = ["MFU (bf16 mm)", "MFU (fp32 mm)"] if precision == "bf16" else ["MFU (fp32 mm)"]
    return [
        "loop",
        "median-step samples/s per run",
        "mean samples/s",
        "steady mean samples/s per run",
        *mfu,
        f"HFU ({precision} mm)",
        "peak PSS MB",
        "peak RSS MB (sum)",
        "other load (cores)",
    ]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench train", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50, help="training steps per run")
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the steady state")
    p.add_argument("--repeats", type=int, default=2, help="runs per side, alternating ours/theirs")
    p.add_argument("--anchor-python", default=DEFAULT_ANCHOR_PYTHON, help="python of the open_clip anchor venv")
    p.add_argument("--no-anchor", action="store_true", help="measure this project only")
    p.add_argument(
        "--no-independent", action="store_true", help="leave out the plain `python -m open_clip_train.main` runs"
    )
    p.add_argument(
        "--independent-log-every",
        type=int,
        default=10,
        help="--log-every-n-steps of the plain open_clip_train.main runs: its median is over its logged intervals, "
        "so the interval must be well below --steps (its default, 100, needs 300+ steps)",
    )
    p.add_argument(
        "--precision",
        choices=sorted(PRECISIONS),
        default="bf16",
        help="bf16: bf16-mixed vs open_clip's amp_bf16 (needs a CPU with a fast bf16 matmul); fp32: 32-true vs fp32",
    )
    p.add_argument("--ours-args", default="", help="extra train.py overrides for our runs (one string)")
    p.add_argument("--quiet-wait", type=float, default=30.0, help="max wait for a quiet machine before each run, s")
    p.add_argument("--gpu", action="store_true", help="GPU benchmark (not implemented yet, see BENCHMARKS.md)")
    p.add_argument("--name", default="train", help="results go to bench/results/<name>.json")
    return p


def measure_model(data: dict) -> tuple[float, dict]:
    """Mean trimmed text length of a batch, and FLOPs per sample at 128 tokens and at that length."""
    text_len = mean_batch_text_length(data["shards"], data["tokenizer"])
    counted = flops_per_sample(data["tokenizer"], [128, round(text_len)])
    return text_len, {128: counted[128], "trimmed": counted[round(text_len)]}


def main(argv: list[str]) -> None:
    a = _parser().parse_args(argv)
    if a.gpu:
        raise SystemExit("python -m bench train --gpu: not implemented yet (no GPU in the session that wrote it)")
    if a.precision == "bf16":
        refuse_slow_bf16("python -m bench train")
    anchor = None if a.no_anchor else check_anchor_python(a.anchor_python)
    data = ensure_bench_data()
    machine = machine_info()
    print(f"[bench] {machine['cpu']}, {machine['cores']} cores, load {machine['load_avg_1m']}", flush=True)
    text_len, flops = measure_model(data)
    wait_for_quiet(a.quiet_wait)
    rates = matmul_rates()

    run_root = RESULTS_DIR / "runs" / a.name
    model_json = open_clip_model_json(data["tokenizer"], run_root)
    ours_args = ["--trainer.precision", PRECISIONS[a.precision][0], *a.ours_args.split()]
    sides = [("ours", lambda i: run_ours(data, a.steps, a.warmup, run_root / f"ours-{i}", ours_args))]
    if anchor:
        sides.append(
            (
                "theirs",
                lambda i: run_theirs(
                    data, a.steps, a.warmup, run_root / f"theirs-{i}", anchor, model_json, precision=a.precision
                ),
            )
        )
        if not a.no_independent:
            sides.append(
                (
                    "independent",
                    lambda i: run_independent(
                        data,
                        a.steps,
                        a.warmup,
                        run_root / f"independent-{i}",
                        anchor,
                        model_json,
                        a.independent_log_every,
                        precision=a.precision,
                    ),
                )
            )
    runs = {"theirs": [], "independent": [], **alternate(sides, a.repeats, a.quiet_wait)}
    wait_for_quiet(a.quiet_wait)
    rates_after = matmul_rates()
    rates = {k: max(v, rates_after[k]) for k, v in rates.items()}  # the peak: best of before and after

    rows, summary = summarise(runs, flops, rates, a.precision)
    table = markdown_table(headers(a.precision), rows) + (
        f"\n\nmatmul peak: bf16 {rates['bf16']:.0f} GFLOP/s, fp32 {rates['fp32']:.0f} GFLOP/s; model fwd+bwd "
        f"{flops[128] / 1e9:.2f} GFLOP/sample at 128 tokens, {flops['trimmed'] / 1e9:.2f} at the mean trimmed batch "
        f"length {text_len:.0f} (MFU counts the latter for both sides, HFU what each side executes)"
        + (f"; medclip-train / open_clip = {summary['ratio']:.2f}x" if "ratio" in summary else "")
        + (
            f"; medclip-train / plain open_clip_train.main = {summary['ratio_independent']:.2f}x"
            if "ratio_independent" in summary
            else ""
        )
    )
    print(table)
    result = {
        "machine": machine,
        "command": "python -m bench train " + " ".join(argv),
        "settings": {**vars(a), "batch_size": BATCH_SIZE, "preset": PRESET},
        "matmul_gflops": rates,
        "gflop_per_sample": {"context_128": flops[128] / 1e9, "trimmed": flops["trimmed"] / 1e9},
        "mean_trimmed_text_length": text_len,
        "runs": runs,
        "summary": summary,
        "table": table,
    }
    print(f"[bench] wrote {write_result(a.name, result)}")
