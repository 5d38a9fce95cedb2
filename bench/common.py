"""What the benchmarks share: the benchmark shards and tokenizer, the machine, matmul peaks, memory, tables.

Imports are stdlib-only at module level: ``bench/_anchor.py`` runs in open_clip's own venv and must not need
anything of this project, and the benchmark drivers should start fast.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import platform
import random
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DATA_DIR = BENCH_DIR / "data"
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_ANCHOR_PYTHON = "/tmp/venv_anchor/bin/python"
ANCHOR_INSTALL = (
    'python3 -m venv /tmp/venv_anchor && /tmp/venv_anchor/bin/pip install "torch==2.14.1" "torchvision==0.29.1" '
    'open_clip_torch==3.3.0 "webdataset==0.2.86" transformers timm pandas'
)

# ---- benchmark shards ----------------------------------------------------------------------------------------------
SHARD_SAMPLES = 500
SHARD_COUNT = 6
_GEN_VERSION = 2  # 2: the tokenizer is medclip-prep's deterministic WordPiece
"""Bump when the generator changes, so that ``ensure_bench_data`` rewrites the shards."""

_MODALITIES = {
    "chest x-ray": "gray",
    "ct scan": "gray",
    "mri": "gray",
    "ultrasound": "gray",
    "histology": "stain",
    "fundus photograph": "fundus",
    "dermoscopy": "skin",
}
_WORDS = {
    "finding": (
        "nodule mass opacity effusion consolidation lesion infiltrate calcification hemorrhage infarct cyst fracture "
        "edema atelectasis pneumothorax lymphadenopathy carcinoma adenocarcinoma metastasis granuloma fibrosis "
        "stenosis aneurysm thrombus"
    ).split(),
    "place": (
        "right upper lobe, left lower lobe, right hilum, left ventricle, mediastinum, pleural space, "
        "liver segment vii, renal cortex, basal ganglia, frontal lobe, thyroid isthmus, distal radius, "
        "pancreatic head, gallbladder fundus, retina, optic disc, dermis, colonic mucosa, lymph node"
    ).split(", "),
    "adj": (
        "small large ill-defined well-circumscribed hypodense hyperintense spiculated diffuse focal bilateral "
        "heterogeneous enhancing necrotic calcified cystic irregular subtle"
    ).split(),
    "verb": "shows demonstrates reveals depicts highlights indicates confirms suggests".split(),
    "filler": (
        "arrow marks the region of interest compared with prior study after contrast administration stain "
        "magnification scale bar patient year-old male female presenting pain follow-up months later biopsy proven "
        "axial coronal sagittal view image panel figure measuring mm cm hematoxylin eosin x40"
    ).split(),
}


def _caption(rng: random.Random, modality: str) -> str:
    """A figure-caption-like text of 20-60 words."""
    target = rng.randint(20, 60)
    words: list[str] = []
    while len(words) < target:
        sentence = (
            f"{rng.choice(['a', 'the', 'panel'])} {modality} {rng.choice(_WORDS['verb'])} a "
            f"{rng.choice(_WORDS['adj'])} {rng.choice(_WORDS['finding'])} in the {rng.choice(_WORDS['place'])}"
        ).split()
        sentence += rng.sample(_WORDS["filler"], rng.randint(3, 10))
        if rng.random() < 0.4:
            sentence += [f"({rng.randint(2, 90)}", "mm)"]
        words += sentence
        words[-1] += rng.choice([".", ";", ","])
    words = words[:target]
    words[0] = words[0].capitalize()
    return " ".join(words).rstrip(",;") + "."


def _image(rng, style: str, width: int, height: int):
    """A textured image: smooth anatomy-like structure, blobs, and sensor noise (so JPEG decode cost is real)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    # Low-frequency structure: a coarse random field upsampled bicubically.
    coarse = rng.random((int(rng.integers(6, 15)), int(rng.integers(6, 15)), 3)).astype(np.float32)
    base = Image.fromarray((coarse * 255).astype(np.uint8), "RGB").resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(rng.integers(5, 25)):
        x, y = rng.integers(0, width), rng.integers(0, height)
        r = int(rng.integers(4, max(6, min(width, height) // 6)))
        shade = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=shade)
    base = base.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1.0, 3.0))))
    arr = np.asarray(base, dtype=np.float32)
    if style == "gray":
        arr = arr.mean(axis=2, keepdims=True).repeat(3, axis=2)
    elif style == "stain":  # pink/purple H&E-like
        arr = arr * np.array([0.9, 0.55, 0.8], np.float32) + np.array([40, 20, 50], np.float32)
    elif style == "fundus":
        arr = arr * np.array([1.0, 0.5, 0.25], np.float32)
    elif style == "skin":
        arr = arr * np.array([0.8, 0.6, 0.5], np.float32) + 50
    arr += rng.normal(0.0, float(rng.uniform(4.0, 12.0)), arr.shape).astype(np.float32)  # noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_bench_shards(
    folder: Path, shards: int = SHARD_COUNT, per_shard: int = SHARD_SAMPLES, seed: int = 0
) -> list[str]:
    """Write ``train-NNNNNN.tar`` (``key.jpg``, ``key.txt``, ``key.json``), ``sizes.json``; returns the captions.

    Images are 448-640 px on each side (JPEG quality 90), so our decoder's draft path (scale >= 2 for 224 px)
    applies to most of them, as it does to typical PMC figures.
    """
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    captions, sizes = [], {}
    for s in range(shards):
        name = f"train-{s:06d}.tar"
        with tarfile.open(folder / name, "w") as tf:
            for i in range(per_shard):
                key = f"s{s:02d}_{i:05d}"
                modality = rng.choice(sorted(_MODALITIES))
                img = _image(nrng, _MODALITIES[modality], rng.randint(448, 640), rng.randint(448, 640))
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=90)
                caption = _caption(rng, modality)
                captions.append(caption)
                _add(tf, f"{key}.jpg", buf.getvalue())
                _add(tf, f"{key}.txt", caption.encode())
                _add(tf, f"{key}.json", json.dumps({"id": key, "modality": modality}).encode())
        sizes[name] = per_shard
    (folder / "sizes.json").write_text(json.dumps(sizes))
    return captions


def ensure_bench_data(folder: Path = DATA_DIR) -> dict:
    """Write the benchmark shards and tokenizer once (about a minute); later calls reuse them.

    Returns ``{"shards": brace pattern, "tokenizer": folder, "samples": n, "folder": ...}``.
    """
    marker = folder / "DONE.json"
    info = {
        "shards": str(folder / f"train-{{000000..{SHARD_COUNT - 1:06d}}}.tar"),
        "tokenizer": str(folder / "tokenizer"),
        "samples": SHARD_COUNT * SHARD_SAMPLES,
        "folder": str(folder),
        "version": _GEN_VERSION,
    }
    if marker.exists() and json.loads(marker.read_text()).get("version") == _GEN_VERSION:
        return info
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".gitignore").write_text("*\n")  # generated data never goes into git
    t0 = time.perf_counter()
    print(f"[bench] writing {info['samples']} samples to {folder} (once) ...", flush=True)
    captions = write_bench_shards(folder)
    from data_prep.tokenizer import train_wordpiece  # the builder medclip-prep uses: the same vocabulary every run

    vocab = train_wordpiece(captions, folder / "tokenizer", vocab_size=8192)
    print(f"[bench] shards and tokenizer (vocab {vocab}) written in {time.perf_counter() - t0:.0f} s", flush=True)
    marker.write_text(json.dumps(info))
    return info


# ---- machine -------------------------------------------------------------------------------------------------------
def machine_info() -> dict:
    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def matmul_rates(sizes: tuple[int, ...] = (2048, 4096), seconds: float = 1.5) -> dict:
    """Peak ``torch.mm`` rate in GFLOP/s for bf16 and fp32: the best of several timed windows per size.

    On a CPU whose bf16 matmul is an emulation (``medclip_train.hardware``) bf16 keeps its quick probe's figure: one
    4096^3 bf16 product takes over two minutes there."""
    import torch

    from medclip_train.hardware import bf16_is_emulated, matmul_gflops

    probe = {"bf16": matmul_gflops(torch.bfloat16), "fp32": matmul_gflops(torch.float32)}
    rates = {}
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        if name == "bf16" and bf16_is_emulated(probe["bf16"], probe["fp32"]):
            rates[name] = round(probe["bf16"], 1)
            continue
        best = 0.0
        for n in sizes:
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            torch.mm(a, b)  # warm-up (packing, thread pool)
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                t = time.perf_counter()
                torch.mm(a, b)
                best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
        rates[name] = round(best, 1)
    return rates


def refuse_slow_bf16(command: str) -> None:
    """Stop a CPU benchmark of bf16-autocast steps where the CPU has no fast bf16 matmul: it would time the emulation
    (about 150x slower than fp32 on an AVX2 EPYC), and its bf16 rate probe alone would take minutes."""
    import torch

    from medclip_train.hardware import bf16_is_emulated, matmul_gflops

    bf16, fp32 = matmul_gflops(torch.bfloat16), matmul_gflops(torch.float32)
    if bf16_is_emulated(bf16, fp32):
        raise SystemExit(
            f"{command} times bf16-autocast training steps, but this CPU has no fast bf16 matmul (torch.mm: bf16 "
            f"{bf16:.1f} GFLOP/s, fp32 {fp32:.0f}; torch's CPU capability {torch.backends.cpu.get_cpu_capability()}):"
            " run it on a CPU with AVX512-BF16 or AMX, or `python -m bench gpu` on a GPU"
        )


def gpu_matmul_rates(n: int = 8192, repeats: int = 20) -> dict:
    """``torch.mm`` rate on the GPU in GFLOP/s: bf16, and fp32 with TF32 off (the best of ``repeats``)."""
    import torch

    rates = {}
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        torch.backends.cuda.matmul.allow_tf32 = False
        a, b = torch.randn(n, n, dtype=dtype, device="cuda"), torch.randn(n, n, dtype=dtype, device="cuda")
        torch.mm(a, b)
        best = 0.0
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            end.synchronize()
            best = max(best, 2 * n**3 / (start.elapsed_time(end) / 1e3) / 1e9)
        rates[name] = round(best, 1)
    return rates


# ---- memory of a process tree --------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _memory_mb(pid: int, pss: bool) -> tuple[float, float]:
    """(RSS, PSS) of one process in MiB; PSS only when asked (``smaps_rollup`` costs more than ``statm``).

    PSS splits shared pages (a forked worker's copy-on-write memory) between the processes sharing them, so its sum
    over a process tree is the tree's real footprint.
    """
    rss = pss_mb = 0.0
    try:
        if pss:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss = int(line.split()[1]) / 1024
                    elif line.startswith("Pss:"):
                        pss_mb = int(line.split()[1]) / 1024
        else:
            with open(f"/proc/{pid}/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, IndexError, ValueError):
        pass
    return rss, pss_mb


def tree_memory_mb(pid: int, pss: bool = False) -> tuple[float, float]:
    """(RSS, PSS) summed over a process and all its descendants (main process plus loader workers), in MiB."""
    rss = pss_mb = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        r, q = _memory_mb(p, pss)
        rss, pss_mb = rss + r, pss_mb + q
        todo += _children(p)
    return rss, pss_mb


class PeakRSS:
    """Samples a process tree's memory every ``interval`` s in a thread: ``peak_mb`` (sum of RSS, shared pages
    counted in every process) and, with ``pss=True``, ``peak_pss_mb`` (sum of PSS, the tree's real footprint).

    Every 2 s: reading ``smaps_rollup`` of a 2.5 GB training process costs tens of ms, which at 0.5 s took about
    5% of a core from the run being measured; memory settles within the first steps, so the peak is not missed.
    """

    def __init__(self, pid: int, interval: float = 2.0, pss: bool = False):
        self.pid, self.interval, self.pss = pid, interval, pss
        self.peak_mb = self.peak_pss_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, pss = tree_memory_mb(self.pid, self.pss)
            self.peak_mb, self.peak_pss_mb = max(self.peak_mb, rss), max(self.peak_pss_mb, pss)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def busy_cpu_seconds() -> float:
    """CPU seconds spent busy by all processes on the machine since boot (``/proc/stat``)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_logged(cmd: list[str], log_path: Path, env: dict | None = None, cwd: Path = REPO_ROOT) -> dict:
    """Run ``cmd`` with stdout+stderr into ``log_path``.

    Returns ``rc``, ``peak_rss_mb`` and ``peak_pss_mb`` of its process tree, ``wall_s``, and ``foreign_cores``: the
    average number of cores other processes kept busy meanwhile (on a shared machine a benchmark means little; this
    says how little).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    busy0, own0, t0 = busy_cpu_seconds(), _children_cpu_seconds(), time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        with PeakRSS(proc.pid, pss=True) as mem:
            rc = proc.wait()
    wall = time.perf_counter() - t0
    foreign = (busy_cpu_seconds() - busy0 - (_children_cpu_seconds() - own0)) / wall
    return {
        "rc": rc,
        "peak_rss_mb": round(mem.peak_mb, 1),
        "peak_pss_mb": round(mem.peak_pss_mb, 1),
        "wall_s": round(wall, 1),
        "foreign_cores": round(foreign, 2),
    }


def wait_for_quiet(max_wait_s: float, threshold_cores: float = 0.3, window_s: float = 5.0) -> float:
    """Wait until other processes use less than ``threshold_cores`` over ``window_s`` (at most ``max_wait_s``).

    Returns the busy cores of the last window.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        b0 = busy_cpu_seconds()
        time.sleep(window_s)
        busy = (busy_cpu_seconds() - b0) / window_s
        if busy < threshold_cores or time.monotonic() >= deadline:
            return round(busy, 2)


def bench_env(**extra: str) -> dict:
    """The environment of a benchmark subprocess: this repo importable, no telemetry, offline hub."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("WANDB_MODE", "disabled")
    env.update(extra)
    return env


def check_anchor_python(path: str) -> str:
    if not Path(path).exists():
        raise SystemExit(
            f"open_clip anchor interpreter {path} not found. open_clip 3.3's tar reader needs webdataset 0.2.x, so "
            f"it runs in its own venv; create it once (about 2 min):\n  {ANCHOR_INSTALL}\n"
            "or pass --anchor-python PATH (or --no-anchor to measure this project only)."
        )
    return path


def alternate(runs: list[tuple[str, Callable[[int], dict]]], repeats: int, quiet_wait: float) -> dict[str, list]:
    """Call every ``(name, run)`` in turn, ``repeats`` times (a, b, a, b), each after waiting for a quiet machine.

    ``run(i)`` returns a dict with ``samples_per_s`` and ``foreign_cores`` (see ``run_logged``).
    """
    results: dict[str, list] = {name: [] for name, _ in runs}
    for i in range(repeats):
        for name, run in runs:
            quiet = wait_for_quiet(quiet_wait)
            r = {**run(i), "busy_cores_before": quiet}
            results[name].append(r)
            print(
                f"[bench] {name} #{i}: {r['samples_per_s']:.2f} samples/s, other processes {r['foreign_cores']:.2f} "
                f"cores" + (f", peak PSS {r['peak_pss_mb']:.0f} MB" if "peak_pss_mb" in r else ""),
                flush=True,
            )
    return results


# ---- results -------------------------------------------------------------------------------------------------------
def markdown_table(headers: list[str], rows: list[list]) -> str:
    """Benchmark rows (lists in header order) as medclip-eval's markdown table, numbers as BENCHMARKS.md prints them."""
    from medclip_train.evaluation.report import markdown_table as table  # here: this module imports no torch

    return table([dict(zip(headers, row)) for row in rows], headers, cell=_bench_cell)


def _bench_cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"
    return "" if v is None else str(v)


def write_result(name: str, result: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    return path


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")
