"""Time to the first training batch of an epoch with a large shuffle buffer (multi-GPU issue, item 9).

``python -m bench startup`` builds ``WebDataModule``'s train loader on the benchmark shards with
``data.shuffle_buffer`` 5000 (the pretraining config's), and times each epoch start from the loader's creation to
its first batch, and the samples/s of the next batches, two ways, alternating in fresh processes:

* ``full buffer first``: ``shuffle_initial`` = the buffer size, what the stream did before (every worker reads 5000
  raw samples before yielding one);
* ``initial 100``: the default now (webdataset's ``shuffle(bufsize, initial)``: yield from 100, grow to 5000).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from bench.common import (
    RESULTS_DIR,
    alternate,
    bench_env,
    ensure_bench_data,
    machine_info,
    markdown_table,
    mean,
    run_logged,
    write_result,
)

BUFFER = 5000
BATCH_SIZE = 32


def measure(shards: str, tokenizer: str, workers: int, initial: int, batches: int) -> dict:
    from open_clip.tokenizer import HFTokenizer

    from medclip_train.data.datamodule import WebDataModule
    from medclip_train.presets import get_preset

    dm = WebDataModule(train=shards, batch_size=BATCH_SIZE, num_workers=workers, shuffle_buffer=BUFFER)
    preprocess = get_preset("bench_cpu_vit_tiny_bert_mini")["preprocess_cfg"]
    dm.connect(HFTokenizer(tokenizer, context_length=128), {**preprocess, "size": 224})
    loader = dm.train_dataloader()
    loader.world = (0, 1)
    loader.dataset.spec.shuffle_initial = initial
    start = time.perf_counter()
    times = []
    for _ in loader:
        times.append(time.perf_counter())
        if len(times) > batches:
            break
    return {
        "first_batch_s": times[0] - start,
        "samples_per_s": BATCH_SIZE * (len(times) - 1) / (times[-1] - times[0]),
    }


def _child(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    for name in ("--shards", "--tokenizer"):
        p.add_argument(name, required=True)
    for name in ("--workers", "--initial", "--batches"):
        p.add_argument(name, type=int, required=True)
    a = p.parse_args(argv)
    print("RESULT " + json.dumps(measure(a.shards, a.tokenizer, a.workers, a.initial, a.batches)))


def _run(cmd: list[str], log_name: str) -> dict:
    log = RESULTS_DIR / "runs" / "startup" / f"{log_name}.log"
    proc = run_logged(cmd, log, env=bench_env())
    lines = [line for line in log.read_text().splitlines() if line.startswith("RESULT ")]
    if proc["rc"] != 0 or not lines:
        raise RuntimeError(f"{log_name} failed (exit {proc['rc']}); see {log}")
    return {**json.loads(lines[-1].removeprefix("RESULT ")), **proc}


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        return _child(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench startup", description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batches", type=int, default=10, help="batches timed after the first")
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args(argv)
    data = ensure_bench_data()
    ways = {"full buffer first": BUFFER, "initial 100": 100}
    runs = []
    for w in a.workers:
        for label, initial in ways.items():
            cmd = [
                sys.executable,
                "-m",
                "bench",
                "startup",
                "--child",
                "--shards",
                data["shards"],
                "--tokenizer",
                data["tokenizer"],
                "--workers",
                str(w),
                "--initial",
                str(initial),
                "--batches",
                str(a.batches),
            ]
            runs.append((f"{label} w={w}", lambda i, cmd=cmd, tag=f"{initial}-w{w}": _run(cmd, f"{tag}-{i}")))
    results = alternate(runs, a.repeats, quiet_wait=10)
    rows = []
    for w in a.workers:
        for label in ways:
            r = results[f"{label} w={w}"]
            rows.append(
                [
                    label,
                    w,
                    " / ".join(f"{x['first_batch_s']:.2f}" for x in r),
                    mean([x["first_batch_s"] for x in r]),
                    mean([x["samples_per_s"] for x in r]),
                    " / ".join(f"{x['foreign_cores']:.2f}" for x in r),
                ]
            )
    table = markdown_table(
        [
            "shuffle buffer start",
            "workers",
            "first batch (s) per run",
            "mean first batch (s)",
            "samples/s after",
            "other load (cores)",
        ],
        rows,
    )
    print(table)
    result = {
        "machine": machine_info(),
        "command": "python -m bench startup " + " ".join(argv),
        "runs": results,
        "table": table,
    }
    print(f"[bench] wrote {write_result('startup', result)}")
