"""Data pipeline throughput: read, decode, transform, tokenize and batch, with nothing training behind it.

``python -m bench data`` measures, on the benchmark shards, in one run:

* ``raw``: the limit, PIL open + ``draft`` + resize to 224 px of the same JPEGs, held in memory, in 1 and 2
  processes (one per core);
* ``medclip-train``: ``WebDataModule``'s train loader at 1 and 2 workers;
* ``open_clip 3.3``: ``open_clip_train.data.get_wds_dataset`` (train mode) at 1 and 2 workers, in the anchor venv.

Both loaders use ``image_transform_v2`` at 224 px in train mode (RandomResizedCrop scale (0.9, 1.0), bicubic), the
same tokenizer at context 128, and batch size 32. Every measurement runs in a fresh process; the loaders
alternate (ours, theirs, ours, theirs) and each leaves out its first ``--warmup`` batches.

The loaders are measured in their steady state: shards drawn with replacement (ours ``epoch_mode=resampled``,
open_clip's ``--dataset-resampled``), so the stream does not end, and a warm-up of 40 batches, past the filling of
the 1000-sample shuffle buffers (each worker reads two samples per sample it yields until its buffer is full: in
the first 40 batches of a 3000-sample epoch with two workers that made ours 6-8% slower than later). ``--exact``
measures the start of an exact epoch instead (the method of the tables before 2026-12-01, with ``--warmup 3``).
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
    alternate,
    bench_env,
    check_anchor_python,
    ensure_bench_data,
    machine_info,
    markdown_table,
    mean,
    run_logged,
    write_result,
)

BATCH_SIZE = 32
IMAGE_SIZE = 224
CONTEXT_LENGTH = 128
RAW_IMAGES = 1280  # per raw process: 2 x 1280 of the bench set's 3000 JPEGs, each decoded once


# ---- children: each measurement in its own process ------------------------------------------------------------------
def _read_jpegs(shards: str, start: int, count: int) -> list[bytes]:
    import tarfile

    from webdataset.shardlists import expand_urls

    jpegs: list[bytes] = []
    for url in expand_urls(shards):
        with tarfile.open(url) as tf:
            jpegs += [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".jpg")]
        if len(jpegs) >= start + count:
            break
    return jpegs[start : start + count]


def _raw_worker(shards: str, start: int, count: int, barrier, queue) -> None:
    """Decode+resize ``count`` JPEGs held in memory; the clock starts when every process is ready."""
    import io

    from PIL import Image

    images = _read_jpegs(shards, start, count)
    barrier.wait()
    t0 = time.perf_counter()
    for data in images:
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (IMAGE_SIZE, IMAGE_SIZE))  # libjpeg's largest 1/2^k scale that stays >= 224
        img = img.convert("RGB")
        scale = IMAGE_SIZE / min(img.size)
        size = (max(IMAGE_SIZE, round(img.width * scale)), max(IMAGE_SIZE, round(img.height * scale)))
        img.resize(size, Image.BICUBIC)
    queue.put((len(images), t0, time.perf_counter()))


def measure_raw(shards: str, procs: int, n_images: int) -> dict:
    """Decode+resize rate of ``procs`` processes running together, each over its own ``n_images`` JPEGs."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    barrier, queue = ctx.Barrier(procs), ctx.Queue()
    workers = [
        ctx.Process(target=_raw_worker, args=(shards, i * n_images, n_images, barrier, queue)) for i in range(procs)
    ]
    for w in workers:
        w.start()
    results = [queue.get() for _ in workers]
    for w in workers:
        w.join()
    wall = max(end for _, _, end in results) - min(start for _, start, _ in results)
    return {
        "samples_per_s": sum(n for n, _, _ in results) / wall,
        "per_process": [n / (end - start) for n, start, end in results],
    }


def measure_ours(shards: str, tokenizer: str, workers: int, batches: int, warmup: int, exact: bool) -> dict:
    from open_clip.tokenizer import HFTokenizer

    from medclip_train.data.datamodule import WebDataModule
    from medclip_train.presets import get_preset

    stream = {} if exact else {"epoch_mode": "resampled", "samples_per_epoch": (batches + warmup + 2) * BATCH_SIZE}
    dm = WebDataModule(train=shards, batch_size=BATCH_SIZE, num_workers=workers, shuffle_buffer=1000, **stream)
    preprocess = get_preset("bench_cpu_vit_tiny_bert_mini")["preprocess_cfg"]
    dm.connect(HFTokenizer(tokenizer, context_length=CONTEXT_LENGTH), {**preprocess, "size": IMAGE_SIZE})
    loader = dm.train_dataloader()
    loader.world = (0, 1)
    return _time_batches(((b["image"], b["text"]) for b in loader), batches, warmup)


def _time_batches(batches_iter, batches: int, warmup: int) -> dict:
    start = time.perf_counter()  # the iterator is lazy: workers start and fill their buffers from here
    times, n = [], 0
    for i, (images, _) in enumerate(batches_iter):
        times.append(time.perf_counter())
        if i > warmup:
            n += images.shape[0]
        if len(times) > warmup + batches:
            break
    return {
        "samples_per_s": n / (times[-1] - times[warmup]),
        "batches": len(times) - warmup - 1,
        "first_batch_s": times[0] - start,
    }


def child_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["raw", "ours"])
    p.add_argument("--shards", required=True)
    p.add_argument("--tokenizer")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--exact", action="store_true")
    a = p.parse_args(argv)
    if a.what == "raw":
        out = measure_raw(a.shards, a.workers, n_images=RAW_IMAGES)
    else:
        out = measure_ours(a.shards, a.tokenizer, a.workers, a.batches, a.warmup, a.exact)
    print("RESULT " + json.dumps(out))


# ---- driver ----------------------------------------------------------------------------------------------------------
LABELS = {
    "ours": "medclip-train WebDataModule",
    "theirs": "open_clip get_wds_dataset",
    "raw": "raw limit: PIL open+draft+resize",
}
HEADERS = [
    "pipeline",
    "workers (raw: processes)",
    "samples/s per run",
    "mean samples/s",
    "vs open_clip",
    "fraction of raw limit",
    "first batch (s)",
    "other load (cores)",
]


def _run(cmd: list[str], log_name: str, env: dict) -> dict:
    log = RESULTS_DIR / "runs" / "data" / f"{log_name}.log"
    proc = run_logged(cmd, log, env=env)
    lines = [line for line in log.read_text().splitlines() if line.startswith(("RESULT ", "{"))]
    if proc["rc"] != 0 or not lines:
        raise RuntimeError(f"{log_name} failed (exit {proc['rc']}); see {log}")
    return {**json.loads(lines[-1].removeprefix("RESULT ")), **proc}


def measurements(
    data: dict, workers: int, batches: int, warmup: int, anchor: str | None, exact: bool = False
) -> list[tuple]:
    """``(name, run(i))`` for the raw limit, ours and open_clip's at one worker count."""
    shards, tokenizer = ["--shards", data["shards"]], ["--tokenizer", data["tokenizer"]]
    common = ["--workers", str(workers), "--batches", str(batches), "--warmup", str(warmup)]
    common += ["--exact"] if exact else []
    child = [sys.executable, "-m", "bench", "data", "--child"]
    cmds = {
        "raw": ([*child, "raw", *shards, *common], bench_env()),
        "ours": ([*child, "ours", *shards, *tokenizer, *common], bench_env()),
    }
    if anchor:
        cmds["theirs"] = (
            [anchor, str(REPO_ROOT / "bench" / "_anchor.py"), "data", *shards, *tokenizer, *common],
            bench_env(PYTHONPATH=""),
        )
    return [
        (f"{name} w={workers}", lambda i, cmd=cmd, env=env, name=name: _run(cmd, f"{name}-w{workers}-{i}", env))
        for name, (cmd, env) in cmds.items()
    ]


def table_rows(results: dict[str, list], workers: list[int]) -> tuple[list[list], dict]:
    rows, summary = [], {}
    for w in workers:
        rate = {n: mean([r["samples_per_s"] for r in results[f"{n} w={w}"]]) for n in LABELS if f"{n} w={w}" in results}
        summary[str(w)] = {
            "samples_per_s": rate,
            "ours_over_open_clip": rate["ours"] / rate["theirs"] if "theirs" in rate else None,
            "ours_fraction_of_raw": rate["ours"] / rate["raw"],
        }
        for name, value in rate.items():
            runs = results[f"{name} w={w}"]
            rows.append(
                [
                    LABELS[name],
                    w,
                    " / ".join(f"{r['samples_per_s']:.0f}" for r in runs),
                    value,
                    f"{value / rate['theirs']:.2f}x" if "theirs" in rate else "",
                    f"{value / rate['raw']:.2f}",
                    " / ".join(f"{r['first_batch_s']:.2f}" for r in runs if "first_batch_s" in r),
                    " / ".join(f"{r['foreign_cores']:.2f}" for r in runs),
                ]
            )
    return rows, summary


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench data", description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=60, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=40, help="batches left out first (shuffle buffer fill, start-up)")
    p.add_argument("--exact", action="store_true", help="the start of an exact epoch instead of a resampled stream")
    p.add_argument("--repeats", type=int, default=2, help="measurements per loader and worker count")
    p.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    p.add_argument("--anchor-python", default=DEFAULT_ANCHOR_PYTHON, help="python of the open_clip anchor venv")
    p.add_argument("--no-anchor", action="store_true", help="measure this project only")
    p.add_argument("--quiet-wait", type=float, default=20.0, help="max wait for a quiet machine before each run, s")
    p.add_argument("--name", default="data", help="results go to bench/results/<name>.json")
    return p


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    a = _parser().parse_args(argv)
    anchor = None if a.no_anchor else check_anchor_python(a.anchor_python)
    data = ensure_bench_data()
    machine = machine_info()
    workers = [int(w) for w in a.workers.split(",")]
    results = {}
    for w in workers:
        results.update(alternate(measurements(data, w, a.batches, a.warmup, anchor, a.exact), a.repeats, a.quiet_wait))
    rows, summary = table_rows(results, workers)
    table = markdown_table(HEADERS, rows)
    print(table)
    result = {
        "machine": machine,
        "command": "python -m bench data " + " ".join(argv),
        "settings": {**vars(a), "batch_size": BATCH_SIZE, "image_size": IMAGE_SIZE, "context_length": CONTEXT_LENGTH},
        "runs": results,
        "summary": summary,
        "table": table,
    }
    print(f"[bench] wrote {write_result(a.name, result)}")
