"""Data pipeline throughput: read, decode, transform, tokenize and batch, with nothing training behind it.

``python -m bench data`` measures, on the benchmark shards, in one run:

* ``raw``: the limit, PIL open + ``draft`` + resize to 224 px of the same JPEGs, held in memory, in 1 and 2
  processes (one per core);
* ``medclip-train``: ``WebDataModule``'s train loader at 1 and 2 workers;
* ``open_clip 3.3``: ``open_clip_train.data.get_wds_dataset`` (train mode) at 1 and 2 workers, in the anchor venv.

Both loaders use ``image_transform_v2`` at 224 px in train mode (RandomResizedCrop scale (0.9, 1.0), bicubic), the
same tokenizer at context 128, and batch size 32. Every measurement runs in a fresh process; the loaders
alternate (ours, theirs, ours, theirs) and each leaves out its first ``--warmup`` batches.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from bench.common import (
    DEFAULT_ANCHOR_PYTHON,
    REPO_ROOT,
    RESULTS_DIR,
    bench_env,
    check_anchor_python,
    ensure_bench_data,
    machine_info,
    markdown_table,
    mean,
    run_logged,
    wait_for_quiet,
    write_result,
)

BATCH_SIZE = 32
IMAGE_SIZE = 224
CONTEXT_LENGTH = 128


# ---- children: each measurement in its own process ------------------------------------------------------------------
def _raw_worker(args: tuple[list[bytes], int]) -> tuple[int, float]:
    import io

    from PIL import Image

    images, size = args
    t0 = time.perf_counter()
    for data in images:
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (size, size))  # libjpeg picks the largest 1/2^k scale that stays >= size
        img = img.convert("RGB")
        scale = size / min(img.size)
        img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))), Image.BICUBIC)
    return len(images), time.perf_counter() - t0


def measure_raw(shards: str, procs: int, n_images: int) -> dict:
    """Decode+resize rate of ``procs`` processes, each over its own ``n_images`` JPEGs held in memory."""
    import multiprocessing as mp
    import tarfile

    from webdataset.shardlists import expand_urls

    jpegs: list[bytes] = []
    for url in expand_urls(shards):
        with tarfile.open(url) as tf:
            jpegs += [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".jpg")]
        if len(jpegs) >= n_images * procs:
            break
    chunks = [(jpegs[i * n_images : (i + 1) * n_images], IMAGE_SIZE) for i in range(procs)]
    with mp.get_context("fork").Pool(procs) as pool:
        _raw_worker(([jpegs[0]] * 4, IMAGE_SIZE))  # warm the decoder in the parent before forking
        t0 = time.perf_counter()
        results = pool.map(_raw_worker, chunks)
        wall = time.perf_counter() - t0
    return {"samples_per_s": sum(n for n, _ in results) / wall, "per_process": [n / t for n, t in results]}


def measure_ours(shards: str, tokenizer: str, workers: int, batches: int, warmup: int) -> dict:
    from open_clip.tokenizer import HFTokenizer

    from medclip_train.data.datamodule import WebDataModule
    from medclip_train.model.presets import get_preset

    dm = WebDataModule(train=shards, batch_size=BATCH_SIZE, num_workers=workers, shuffle_buffer=1000)
    preprocess = get_preset("bench_cpu_vit_tiny_bert_mini")["preprocess_cfg"]
    dm.configure(HFTokenizer(tokenizer, context_length=CONTEXT_LENGTH), {**preprocess, "size": IMAGE_SIZE})
    loader = dm.train_dataloader()
    loader.world = (0, 1)
    return _time_batches(((b["image"], b["text"]) for b in loader), batches, warmup)


def _time_batches(batches_iter, batches: int, warmup: int) -> dict:
    times, n = [], 0
    for i, (images, _) in enumerate(batches_iter):
        times.append(time.perf_counter())
        if i > warmup:
            n += images.shape[0]
        if len(times) > warmup + batches:
            break
    return {"samples_per_s": n / (times[-1] - times[warmup]), "batches": len(times) - warmup - 1}


def child_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["raw", "ours"])
    p.add_argument("--shards", required=True)
    p.add_argument("--tokenizer")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    a = p.parse_args(argv)
    if a.what == "raw":
        out = measure_raw(a.shards, a.workers, n_images=(a.batches + a.warmup) * BATCH_SIZE // 2)
    else:
        out = measure_ours(a.shards, a.tokenizer, a.workers, a.batches, a.warmup)
    print("RESULT " + json.dumps(out))


# ---- driver ----------------------------------------------------------------------------------------------------------
def _run(cmd: list[str], log_name: str, env: dict) -> dict:
    log = RESULTS_DIR / "runs" / "data" / f"{log_name}.log"
    proc = run_logged(cmd, log, env=env)
    lines = [line for line in log.read_text().splitlines() if line.startswith(("RESULT ", "{"))]
    if proc["rc"] != 0 or not lines:
        raise RuntimeError(f"{log_name} failed (exit {proc['rc']}); see {log}")
    return {**json.loads(lines[-1].removeprefix("RESULT ")), **proc}


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench data", description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=40, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=3, help="batches left out first (shuffle buffer fill, start-up)")
    p.add_argument("--repeats", type=int, default=2, help="measurements per loader and worker count")
    p.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    p.add_argument("--anchor-python", default=DEFAULT_ANCHOR_PYTHON, help="python of the open_clip anchor venv")
    p.add_argument("--no-anchor", action="store_true", help="measure this project only")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="before each measurement, wait up to this many seconds for other processes to go quiet",
    )
    p.add_argument("--name", default="data", help="results go to bench/results/<name>.json")
    a = p.parse_args(argv)
    anchor = None if a.no_anchor else check_anchor_python(a.anchor_python)
    data = ensure_bench_data()
    machine = machine_info()
    workers = [int(w) for w in a.workers.split(",")]
    shards = ["--shards", data["shards"]]
    common = ["--batches", str(a.batches), "--warmup", str(a.warmup)]
    tokenizer = ["--tokenizer", data["tokenizer"]]
    child = [sys.executable, "-m", "bench", "data", "--child"]
    anchor_cmd = [anchor, str(REPO_ROOT / "bench" / "_anchor.py"), "data"]

    def ours(w: int, i: int) -> dict:
        cmd = [*child, "ours", *shards, *tokenizer, "--workers", str(w), *common]
        return _run(cmd, f"ours-w{w}-{i}", bench_env())

    def theirs(w: int, i: int) -> dict:
        cmd = [*anchor_cmd, *shards, *tokenizer, "--workers", str(w), *common]
        return _run(cmd, f"theirs-w{w}-{i}", bench_env(PYTHONPATH=""))

    def raw(w: int, i: int) -> dict:
        return _run([*child, "raw", *shards, "--workers", str(w), *common], f"raw-p{w}-{i}", bench_env())

    loaders = [("raw", raw), ("ours", ours)] + ([("theirs", theirs)] if anchor else [])
    results: dict[str, dict[int, list]] = {name: {w: [] for w in workers} for name, _ in loaders}
    for w in workers:
        for i in range(a.repeats):
            for name, fn in loaders:
                quiet = wait_for_quiet(a.quiet_wait)
                r = {**fn(w, i), "busy_cores_before": quiet}
                results[name][w].append(r)
                print(
                    f"[bench] {name:6s} workers={w} #{i}: {r['samples_per_s']:.1f} samples/s "
                    f"(other processes {r['foreign_cores']:.2f} cores)",
                    flush=True,
                )

    rows, summary = [], {}
    for w in workers:
        rate = {name: mean([r["samples_per_s"] for r in results[name][w]]) for name, _ in loaders}
        load = {name: mean([r["foreign_cores"] for r in results[name][w]]) for name, _ in loaders}
        summary[w] = {
            "samples_per_s": rate,
            "ours_over_open_clip": rate.get("ours", 0) / rate["theirs"] if "theirs" in rate else None,
            "raw_over_ours": rate["raw"] / rate["ours"],
        }
        for name, label in (
            ("ours", "medclip-train WebDataModule"),
            ("theirs", "open_clip get_wds_dataset"),
            ("raw", "raw limit: PIL open+draft+resize"),
        ):
            if name not in rate:
                continue
            runs = " / ".join(f"{r['samples_per_s']:.0f}" for r in results[name][w])
            vs_raw = f"{rate[name] / rate['raw']:.2f}"
            vs_oc = f"{rate[name] / rate['theirs']:.2f}x" if "theirs" in rate else ""
            rows.append([label, w, runs, rate[name], vs_oc, vs_raw, f"{load[name]:.2f}"])
    headers = [
        "pipeline",
        "workers (raw: processes)",
        "samples/s per run",
        "mean samples/s",
        "vs open_clip",
        "fraction of raw limit",
        "other load (cores)",
    ]
    table = markdown_table(headers, rows)
    print(table)
    result = {
        "machine": machine,
        "command": "python -m bench data " + " ".join(argv),
        "settings": {
            "batches": a.batches,
            "warmup": a.warmup,
            "repeats": a.repeats,
            "batch_size": BATCH_SIZE,
            "image_size": IMAGE_SIZE,
            "context_length": CONTEXT_LENGTH,
        },
        "runs": {name: {str(w): rs for w, rs in per.items()} for name, per in results.items()},
        "summary": {str(w): s for w, s in summary.items()},
        "table": table,
    }
    print(f"[bench] wrote {write_result(a.name, result)}")
