"""GPU training throughput: the BiomedCLIP preset at batch 256 in bf16, this project's loop against open_clip_train.

``python -m bench gpu`` (on a machine with a CUDA GPU) runs, alternately, ``train.py fit`` and open_clip_train
(anchor python, see README.md) on the bench shards with ViT-B/16 at 224 px + a PubMedBERT-sized text tower
(12 layers, 768 wide, context 256; architecture only, random init, so nothing is downloaded), embed 512,
batch 256, bf16 autocast, the same number of loader workers; open_clip with its users' ``--local-loss
--gather-with-grad`` and its default logging interval. Reported per side: the median-step samples/s after
``--warmup`` steps, measured as ``bench train`` does (ours: host clock per step; theirs: open_clip's own per-step
batch time), MFU against the bf16 ``torch.mm`` rate measured on the same GPU in the same run, and peak GPU memory
(``nvidia-smi``, the most memory in use on the card during the run, less what was in use before it).

``--strategy fsdp`` adds a third side: this project's loop under FSDP2 (Lightning's ``ModelParallelStrategy``, the
model sharded with ``fully_shard`` over ``--devices`` processes), beside the same loop under DDP on as many
processes (open_clip 3.3 has no FSDP; its side runs one process): samples/s, MFU and peak GPU memory of each,
which is the GPU check the README's FSDP line waits for. ``--devices N`` runs our sides on N GPUs (default 1).

``--device cpu`` with a small ``--preset``/``--batch-size`` runs the same code path on a CPU (a smoke test of the
command, not a measurement).
"""

from __future__ import annotations

import argparse
import subprocess
import threading
from pathlib import Path

from bench.common import (
    DEFAULT_ANCHOR_PYTHON,
    RESULTS_DIR,
    alternate,
    check_anchor_python,
    ensure_bench_data,
    gpu_matmul_rates,
    machine_info,
    markdown_table,
    mean,
    write_result,
)
from bench.train import flops_per_sample, mean_batch_text_length, open_clip_model_json, run_ours, run_theirs

PRESET = "biomedclip_vit_b16_pubmedbert256"
TEXT_MODEL = "builtin:pubmedbert-base"  # PubMedBERT's architecture, no weights: the machine may be offline


def visible_gpu_id() -> str:
    """nvidia-smi's id of the GPU torch calls cuda:0. nvidia-smi ignores CUDA_VISIBLE_DEVICES, so ``--id=0`` read
    the machine's first GPU, not the one the runs use; the UUID names the same device in both."""
    import torch

    uuid = str(getattr(torch.cuda.get_device_properties(0), "uuid", "") or "")
    return (uuid if uuid.startswith("GPU-") else f"GPU-{uuid}") if uuid else "0"


class GpuMemory:
    """Peak memory in use on GPU 0 while the context is open, less the memory in use when it opened (MiB)."""

    def __init__(self, interval_s: float = 0.5, gpu_id: str = "0"):
        self.interval_s = interval_s
        self.gpu_id = gpu_id
        self.peak = self.base = 0.0
        self._stop = threading.Event()

    def used_mib(self) -> float:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", f"--id={self.gpu_id}"],
            capture_output=True,
            text=True,
        )
        return float(out.stdout.strip() or 0)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self.used_mib())

    def __enter__(self) -> GpuMemory:
        self.base = self.peak = self.used_mib()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return self.peak - self.base


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="training steps per run")
    p.add_argument("--warmup", type=int, default=15, help="steps left out of the steady state")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs per side")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=8, help="loader workers, both sides")
    p.add_argument("--preset", default=PRESET)
    p.add_argument("--text-model", default=TEXT_MODEL)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke test of the command")
    p.add_argument("--devices", type=int, default=1, help="processes (GPUs) per run, every side")
    p.add_argument(
        "--strategy", choices=("ddp", "fsdp"), default="ddp", help="fsdp: also our loop under FSDP2, beside DDP"
    )
    p.add_argument("--anchor-python", default=DEFAULT_ANCHOR_PYTHON, help="python with open_clip 3.3 + wds 0.2.86")
    p.add_argument("--no-anchor", action="store_true", help="measure this project only")
    p.add_argument("--name", default="gpu", help="results go to bench/results/<name>.json")
    return p


def main(argv: list[str]) -> None:
    a = _parser().parse_args(argv)
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("python -m bench gpu: no CUDA GPU visible (torch.cuda.is_available() is False)")
    anchor = None if a.no_anchor else check_anchor_python(a.anchor_python)
    data = ensure_bench_data()
    machine = machine_info()
    if a.device == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(0)
        rates = gpu_matmul_rates()
    else:
        from bench.common import matmul_rates

        rates = matmul_rates()
    from medclip_train.presets import get_preset

    context = get_preset(a.preset)["model_cfg"]["text_cfg"]["context_length"]  # open_clip pads every caption to it
    text_len = mean_batch_text_length(data["shards"], data["tokenizer"], context, batch_size=a.batch_size)
    # FLOPs per sample hardly depend on the batch (the loss's B x B logits are < 0.01%): counted at batch 8.
    flops = flops_per_sample(
        data["tokenizer"], [context, round(text_len)], a.preset, a.text_model, batch_size=8, device=a.device
    )
    print(f"[bench] {machine}; mm GFLOP/s {rates}; GFLOP/sample {flops[round(text_len)] / 1e9:.1f}", flush=True)

    run_root = RESULTS_DIR / "runs" / a.name
    model_json = open_clip_model_json(data["tokenizer"], run_root, preset=a.preset, text_model=a.text_model)
    samples = a.steps * a.batch_size
    ours_args = [
        *("--trainer.accelerator", "gpu" if a.device == "cuda" else "cpu"),
        *("--model.clip.preset", a.preset, "--model.clip.text_model", a.text_model),
        *("--data.batch_size", str(a.batch_size), "--data.num_workers", str(a.workers)),
        # The bench set has 3000 samples: draw shards with replacement so that any batch size x steps fits.
        *("--data.epoch_mode", "resampled", "--data.samples_per_epoch", str(samples)),
    ]
    if a.devices > 1:
        ours_args += ["--trainer.devices", str(a.devices), "--trainer.strategy", "ddp"]
    fsdp_args = [
        *ours_args,
        *("--trainer.devices", str(a.devices), "--trainer.strategy", "ModelParallelStrategy"),
        *("--trainer.strategy.data_parallel_size", str(a.devices), "--trainer.strategy.tensor_parallel_size", "1"),
        *("--trainer.strategy.save_distributed_checkpoint", "false"),
    ]
    theirs_flags = {"--device": a.device, "--batch-size": a.batch_size, "--workers": a.workers}

    gpu_id = "0"
    if a.device == "cuda":
        # The runs are child processes: the memory this process cached for the rate and FLOP counts above would
        # stay reserved on the GPU (and inside nvidia-smi's baseline) through all of them.
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        gpu_id = visible_gpu_id()

    def measured(run):
        def go(i: int) -> dict:
            if a.device != "cuda":
                return run(i)
            with GpuMemory(gpu_id=gpu_id) as mem:
                r = run(i)
            return {**r, "peak_gpu_mib": mem.peak_mib}

        return go

    sides = [
        (
            "ours",
            measured(
                lambda i: run_ours(data, a.steps, a.warmup, run_root / f"ours-{i}", ours_args, batch_size=a.batch_size)
            ),
        )
    ]
    if a.strategy == "fsdp":
        run_dir = run_root / "ours-fsdp-{}"
        sides.append(
            (
                "ours_fsdp",
                measured(
                    lambda i: run_ours(
                        data, a.steps, a.warmup, Path(str(run_dir).format(i)), fsdp_args, batch_size=a.batch_size
                    )
                ),
            )
        )
    if anchor:
        sides.append(
            (
                "theirs",
                measured(
                    lambda i: run_theirs(
                        data,
                        a.steps,
                        a.warmup,
                        run_root / f"theirs-{i}",
                        anchor,
                        model_json,
                        batch_size=a.batch_size,
                        overrides=theirs_flags,
                        extra=["--dataset-resampled"],
                    )
                ),
            )
        )
    runs = {"theirs": [], "ours_fsdp": [], **alternate(sides, a.repeats, quiet_wait=0 if a.device == "cuda" else 10)}
    rows, summary = [], {}
    labelled = (
        ("ours", "medclip-train" + (" (DDP)" if a.strategy == "fsdp" else ""), round(text_len)),
        ("ours_fsdp", "medclip-train (FSDP2)", round(text_len)),
        ("theirs", "open_clip 3.3", context),
    )
    for side, label, executed in labelled:
        if not runs[side]:
            continue
        sps = mean([r["samples_per_s"] for r in runs[side]])
        summary[side] = {
            "samples_per_s": sps,
            "mfu_bf16": sps * flops[round(text_len)] / (rates["bf16"] * 1e9),
            "hfu_bf16": sps * flops[executed] / (rates["bf16"] * 1e9),
            "peak_gpu_mib": max((r.get("peak_gpu_mib", 0.0) for r in runs[side]), default=0.0),
            "cuda_syncs_per_step": next(
                (r["cuda_syncs_per_step"] for r in runs[side] if r.get("cuda_syncs_per_step") is not None), None
            ),
        }
        s = summary[side]
        rows.append(
            [
                label,
                " / ".join(f"{r['samples_per_s']:.0f}" for r in runs[side]),
                sps,
                f"{100 * s['mfu_bf16']:.0f}%",
                f"{100 * s['hfu_bf16']:.0f}%",
                round(s["peak_gpu_mib"]),
                "" if s["cuda_syncs_per_step"] is None else s["cuda_syncs_per_step"],
            ]
        )
    if "ours" in summary and "theirs" in summary:
        summary["ratio"] = summary["ours"]["samples_per_s"] / summary["theirs"]["samples_per_s"]
    if "ours" in summary and "ours_fsdp" in summary:
        summary["fsdp_vs_ddp"] = summary["ours_fsdp"]["samples_per_s"] / summary["ours"]["samples_per_s"]
    headers = [
        "loop",
        "samples/s per run",
        "mean samples/s",
        "MFU (bf16 mm)",
        "HFU (bf16 mm)",
        "peak GPU MiB",
        "host syncs/step",
    ]
    table = markdown_table(headers, rows) + (
        f"\n\nmatmul peak: bf16 {rates['bf16']:.0f} GFLOP/s, fp32 {rates['fp32']:.0f} GFLOP/s; "
        f"{flops[round(text_len)] / 1e9:.1f} GFLOP/sample at the mean trimmed text length {text_len:.0f}"
        + (f"; medclip-train / open_clip = {summary['ratio']:.2f}x" if "ratio" in summary else "")
        + (f"; FSDP2 / DDP = {summary['fsdp_vs_ddp']:.2f}x" if "fsdp_vs_ddp" in summary else "")
    )
    print(table)
    result = {
        "machine": machine,
        "command": "python -m bench gpu " + " ".join(argv),
        "settings": vars(a),
        "matmul_gflops": rates,
        "gflop_per_sample": {str(k): v / 1e9 for k, v in flops.items()},
        "runs": runs,
        "summary": summary,
        "table": table,
    }
    print(f"[bench] wrote {write_result(a.name, result)}")
