"""Fault injection into real training processes: SIGTERM and SIGKILL at random steps, resumes, run-folder guards.

``python -m bench faults [--trials 10] [--seed 0] [--per-shard 24] [--random-crops] [--keep] [--work DIR]``

Every run is a ``train.py fit`` subprocess with the ``tiny`` preset on CPU (``configs/test_tiny.yaml``), on two
generated shards (``tests/shardkit.py``) with a WordPiece tokenizer built from their captions. The
plan: 2 x 24 samples, batch 4, so an exact epoch is 12 steps; ``max_steps`` 24 (two epochs), a checkpoint every 3
steps. The test callbacks ``KeyRecorder`` (the sample keys of every step, appended and fsynced per step) and
``SlowDown`` (a short sleep after each step, so that a signal sent after step k's record lands before step k + 1)
are loaded by class path from ``tests/training/conftest.py``.

Cases, one table row each:

* reference: an uninterrupted run; each epoch must train on every sample exactly once.
* trial i: the same run, SIGTERM (even i) or SIGKILL (odd i) once the KeyRecorder file reaches a random step, then
  ``--ckpt_path last`` until the run is done; every third trial is hit again during its resume (the other
  signal). Checked: exit codes (143 after SIGTERM, -9 after SIGKILL, 0 at the end), the step each resume starts
  from (SIGTERM: the last finished step; SIGKILL: the last periodic checkpoint), the stale lock of a killed run
  taken over with a warning, the final ``last.ckpt`` and ``summary.json`` at ``max_steps``, and the samples of
  each epoch: for each step the keys of the last run that trained it (a SIGKILL re-trains the steps after the
  last checkpoint), whose multiset per epoch must equal the reference's; and the weights: every crop is the
  whole (square) image (``data.train_scale [1.0, 1.0]``), so that nothing random lies outside the checkpoint, and the
  final weights (and those of the resumed-from checkpoint, when the reference has one of that step) must equal
  the reference's bit for bit. ``--random-crops`` keeps the config's random crops: the resumed part then draws
  other crops (the RNG state is not checkpointed; every start reseeds) and the difference is only reported.
  Reported, not required: whether every batch of every run equals the reference's batch of that step.
* concurrent run: a second run started in the folder of a training run exits 2 at once naming the first run's
  PID; the first finishes and its ``metrics.csv`` has every step once; its weights equal the reference's (the
  same seed and data from the start: the runs are deterministic, so a weight difference in a trial comes from
  its resume). It saves only at its end, so its ``last.ckpt`` is the kind written by a run's end.
* batch size: resumes with ``--data.batch_size 8`` from a checkpoint in the middle of an epoch to that epoch's end
  (elastic resume: the reference's steps before the checkpoint and the resumed run's hold every sample once), from
  the periodic
  checkpoint saved at the last step of an epoch, and from the one written at the end of a run that ended with
  its epoch (both accepted: the epoch is complete, nothing is left to continue in the old layout).
* 3 more steps after the run end: the same run end resumed with the same batch size and a higher max_steps (what
  the CLI advises for a finished run).
* SIGTERM at epoch end: a trial whose SIGTERM lands at the last step of the first epoch, with a checkpoint period
  that does not divide the epoch, so that ``last.ckpt`` is written at the end of the stopped run (after the epoch
  was closed) rather than by the periodic save.

Writes ``bench/results/faults.json``, prints a markdown table; the exit status is 1 when any case fails. The run
folders and logs are kept (and named) when a case fails, or with ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.common import REPO_ROOT, bench_env, busy_cpu_seconds, machine_info, markdown_table, write_result

TINY_CONFIG = REPO_ROOT / "configs" / "test_tiny.yaml"
KEY_RECORDER = "tests.training.conftest.KeyRecorder"
SLOW_DOWN = "tests.training.conftest.SlowDown"
WAIT_FOR_FILE = "tests.training.conftest.WaitForFile"
KEYS_FILE = "keys-rank0.jsonl"
OTHER_BATCH_SIZE = 8
HEADERS = [
    "case",
    "signal",
    "fault at step",
    "resumed from",
    "exit codes",
    "final step",
    "samples per epoch match",
    "batches as reference",
    "max abs Δw vs reference (resume point / end)",
    "outcome",
    "notes",
]


@dataclass(frozen=True)
class Plan:
    """The run every case trains: ``shards`` x ``per_shard`` samples, exact epochs of whole batches."""

    shards: int = 2
    per_shard: int = 24
    batch_size: int = 4
    epochs: int = 2
    every: int = 3
    """checkpoint.every_n_train_steps"""
    delay_s: float = 0.2
    """SlowDown after each step."""
    random_crops: bool = False
    """False: ``data.train_scale [1.0, 1.0]`` (every crop is the whole image), so that nothing random is left out
    of the checkpoint and a resumed run must end with the reference's weights bit for bit. True: the config's
    random crops; the resumed part draws other crops (the RNG state is not checkpointed), so the weights differ
    and are only reported."""
    step_timeout_s: float = 20.0
    """Per planned step, on top of ``start_timeout_s``: a run slower than this counts as hung."""
    start_timeout_s: float = 240.0

    def __post_init__(self):
        if (self.shards * self.per_shard) % self.batch_size or (self.shards * self.per_shard) % OTHER_BATCH_SIZE:
            raise ValueError(f"{self.shards} x {self.per_shard} samples must be whole batches of {self.batch_size} "
                             f"and of {OTHER_BATCH_SIZE}")  # fmt: skip

    @property
    def steps_per_epoch(self) -> int:
        return self.shards * self.per_shard // self.batch_size

    @property
    def max_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def timeout(self, steps: int) -> float:
        return self.start_timeout_s + self.step_timeout_s * steps


# ---- processes ------------------------------------------------------------------------------------------------------
class Runner:
    """Starts ``train.py fit`` subprocesses of the plan on the generated data; logs go to ``work/logs``."""

    def __init__(self, work: Path, plan: Plan, pattern: str, tokenizer: Path):
        self.work, self.plan, self.pattern, self.tokenizer = work, plan, pattern, tokenizer
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._count = 0

    def args(self, root: Path, *, max_steps: int | None = None, batch_size: int | None = None,
             every: int | None = None, resume: bool = False) -> list[str]:  # fmt: skip
        p = self.plan
        args = [
            "fit", "--config", str(TINY_CONFIG), "--model.clip.tokenizer", str(self.tokenizer),
            "--data.train", json.dumps([{"shards": self.pattern}]), "--trainer.default_root_dir", str(root),
            "--trainer.max_steps", str(max_steps or p.max_steps), "--data.batch_size", str(batch_size or p.batch_size),
            "--checkpoint.every_n_train_steps", str(every or p.every),
            *([] if p.random_crops else ["--data.train_scale", "[1.0, 1.0]"]),
            # KeyRecorder before SlowDown: a signal sent once step k is recorded lands in step k's sleep.
            "--trainer.callbacks+", json.dumps({"class_path": KEY_RECORDER}),
            "--trainer.callbacks+", json.dumps({"class_path": SLOW_DOWN, "init_args": {"delay_s": p.delay_s}}),
        ]  # fmt: skip
        return [*args, "--ckpt_path", "last"] if resume else args

    def start(self, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
        self._count += 1
        log = self.logs / f"{self._count:02d}-{name}.log"
        command = [sys.executable, str(REPO_ROOT / "train.py"), *args]
        with open(log, "w") as out:  # a file, not a pipe: a chatty child never blocks on a full pipe
            proc = subprocess.Popen(command, cwd=REPO_ROOT, env=bench_env(PYTHONUNBUFFERED="1"), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        return proc, log


def finish(proc: subprocess.Popen, timeout_s: float) -> int | None:
    """The exit code, or None after killing a process (group) that did not end within ``timeout_s``."""
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None


def read_keys(path: Path) -> list[dict]:
    """KeyRecorder records; a line cut by a SIGKILL during its write is left out (its step was not recorded)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def wait_for_step(proc: subprocess.Popen, keys: Path, step: int, timeout_s: float) -> int | None:
    """Polls the KeyRecorder file until it holds ``step``; returns the step recorded last (None: the run ended)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        records = read_keys(keys)
        if records and records[-1]["step"] >= step:
            return records[-1]["step"]
        time.sleep(0.02)
    return None


# ---- checkpoints ----------------------------------------------------------------------------------------------------
def checkpoint_info(path: Path) -> dict | None:
    if not path.exists():
        return None
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    data = ckpt.get("WebDataModule") or {}
    return {
        "step": int(ckpt["global_step"]),
        "epoch": data.get("epoch"),
        "batches_in_epoch": data.get("batches_in_epoch"),
        "batch_size": (data.get("layout") or {}).get("batch_size"),
    }


def max_weight_diff(a: Path, b: Path) -> float | None:
    """Largest absolute difference between the model weights of two checkpoints (None: one is missing)."""
    if not (a.exists() and b.exists()):
        return None
    import torch

    sa = torch.load(a, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    sb = torch.load(b, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        return float("inf")
    diffs = [float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].numel()]
    return max(diffs, default=0.0)


def folder_snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def loss_steps(root: Path) -> list[int]:
    """The ``step`` of every ``metrics.csv`` row that logged ``train/loss``."""
    import csv

    path = root / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]


def error_line(log_text: str) -> str:
    """The ``error:`` line of a run's output, else its last line (a traceback's exception)."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    return next((line for line in lines if line.startswith("error:")), lines[-1] if lines else "")


def _fmt_diff(value: float | None) -> str:
    return "n/a" if value is None else ("0" if value == 0 else f"{value:.1e}")


def _slug(case: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in case).strip("-")


def _row(case: str, failures: list[str], **cells) -> dict:
    row = {h: "-" for h in HEADERS}
    row.update({"case": case, **cells})
    row["outcome"] = "FAIL" if failures else "pass"
    row["notes"] = "; ".join(failures)
    return row


# ---- cases ----------------------------------------------------------------------------------------------------------
def per_epoch(steps: dict[int, list[str]], plan: Plan) -> list[Counter]:
    spe = plan.steps_per_epoch
    epochs = [range(e * spe + 1, (e + 1) * spe + 1) for e in range(plan.epochs)]
    return [Counter(k for s in epoch for k in steps.get(s, [])) for epoch in epochs]


def run_reference(runner: Runner, all_keys: list[str]) -> tuple[dict, dict[int, list[str]]]:
    plan, root = runner.plan, runner.work / "reference"
    t0 = time.perf_counter()
    proc, log = runner.start("reference", runner.args(root))
    rc = finish(proc, plan.timeout(plan.max_steps))
    steps = {r["step"]: r["keys"] for r in read_keys(root / KEYS_FILE)}
    failures = []
    if rc != 0:
        failures.append(f"exit {rc} (log {log})")
    if sorted(steps) != list(range(1, plan.max_steps + 1)):
        failures.append(f"steps recorded: {sorted(steps)}")
    each_once = all(c == Counter(all_keys) for c in per_epoch(steps, plan))
    if not each_once:
        failures.append("an epoch did not train on every sample exactly once")
    last = checkpoint_info(root / "last.ckpt")
    row = _row("reference", failures, **{"exit codes": str(rc), "final step": last and last["step"],
               "samples per epoch match": "yes" if each_once else "no"})  # fmt: skip
    row["details"] = {"wall_s": round(time.perf_counter() - t0, 1), "log": str(log)}
    return row, steps


def random_faults(i: int, seed: int, plan: Plan) -> list[tuple[signal.Signals, int | float]]:
    """Trial ``i``'s faults: (signal, step), and for every third trial a second one, (other signal, a fraction of
    the steps left after the resume point). Drawn up front, so that they do not depend on earlier trials' timing."""
    rng = random.Random(seed * 1000 + i)
    first = signal.SIGTERM if i % 2 == 0 else signal.SIGKILL
    faults: list[tuple[signal.Signals, int | float]] = [(first, rng.randint(1, plan.max_steps - 1))]
    fraction = rng.random()
    if i % 3 == 2:
        faults.append((signal.SIGKILL if first == signal.SIGTERM else signal.SIGTERM, fraction))
    return faults


def run_trial(
    runner: Runner, case: str, faults: list, ref_steps: dict[int, list[str]], every: int | None = None
) -> dict:
    """Faults ``[(signal, step), ...]`` in successive runs of one folder, then resumes until the run is done. A
    float step is a fraction of the steps left after the resume point (drawn before the resume point is known)."""
    plan, root = runner.plan, runner.work / _slug(case)
    every = every or plan.every
    ref_root = runner.work / "reference"
    t0 = time.perf_counter()
    failures: list[str] = []
    runs: list[dict] = []
    while len(runs) < len(faults) + 2:
        n = len(runs)
        before = checkpoint_info(root / "last.ckpt")
        resumed_from = before["step"] if before else 0
        fault = faults[n] if n < len(faults) else None
        if fault is not None and isinstance(fault[1], float):
            if resumed_from + 1 > plan.max_steps - 1:
                fault = None  # no step left to hit
            else:
                fault = (fault[0], resumed_from + 1 + int(fault[1] * (plan.max_steps - 1 - resumed_from)))
        proc, log = runner.start(f"{_slug(case)}-run{n}", runner.args(root, every=every, resume=n > 0))
        run = {"signal": fault[0].name if fault else None, "target_step": fault[1] if fault else None,
               "resumed_from": resumed_from if n > 0 else None, "log": str(log)}  # fmt: skip
        if fault is not None:
            sent_at = wait_for_step(proc, root / KEYS_FILE, fault[1], plan.timeout(fault[1]))
            if sent_at is not None:
                proc.send_signal(fault[0])
            run["sent_at"] = sent_at
        run["rc"] = finish(proc, plan.timeout(plan.max_steps))
        run["records"] = read_keys(root / KEYS_FILE)
        if (root / KEYS_FILE).exists():
            (root / KEYS_FILE).rename(root / f"keys-run{n}.jsonl")  # the next run records into a fresh file
        run["last_recorded"] = max((r["step"] for r in run["records"]), default=resumed_from if n else 0)
        run["checkpoint"] = checkpoint_info(root / "last.ckpt")
        run["summary"] = read_json(root / "summary.json")
        run["lock_left"] = (root / ".run.lock").exists()
        run["log_text"] = log.read_text(errors="replace")
        runs.append(run)
        failures += check_run(run, n, every)
        if run["rc"] in (0, None) or fault is None or run["sent_at"] is None:
            break  # done, hung, or ended other than by the fault: resuming again would hide it
    failures += check_trial(runs, plan, ref_steps)

    steps: dict[int, list[str]] = {}
    for run in runs:  # for each step, the keys of the last run that trained it
        steps.update({r["step"]: r["keys"] for r in run["records"]})
    finished = runs[-1]["rc"] == 0 and (runs[-1]["checkpoint"] or {}).get("step") == plan.max_steps
    match = per_epoch(steps, plan) == per_epoch(ref_steps, plan) and sorted(steps) == sorted(ref_steps)
    if finished and not match:
        failures.append("the samples of an epoch differ from the reference's")
    same_batches = all(r["keys"] == ref_steps.get(r["step"]) for run in runs for r in run["records"])
    resume_point = runs[1]["resumed_from"] if len(runs) > 1 else None
    diff_resume = (
        max_weight_diff(root / f"step{resume_point:07d}.ckpt", ref_root / f"step{resume_point:07d}.ckpt")
        if resume_point
        else None
    )
    diff_end = max_weight_diff(root / "last.ckpt", ref_root / "last.ckpt") if finished else None
    if not plan.random_crops and any(d not in (None, 0.0) for d in (diff_resume, diff_end)):
        # Crops are deterministic (train_scale 1.0): nothing random is left outside the checkpoint.
        failures.append(f"weights differ from the reference's (max abs {_fmt_diff(diff_resume)} at the resume "
                        f"point, {_fmt_diff(diff_end)} at the end)")  # fmt: skip
    faulted = [r for r in runs if r["signal"]]
    last = runs[-1]["checkpoint"]
    row = _row(
        case,
        failures,
        **{
            "signal": ", then ".join(r["signal"] for r in faulted),
            "fault at step": ", ".join(str(r["sent_at"]) for r in faulted),
            "resumed from": ", ".join(str(r["resumed_from"]) for r in runs[1:]) or "-",
            "exit codes": ", ".join(str(r["rc"]) for r in runs),
            "final step": last and last["step"],
            "samples per epoch match": ("yes" if match else "no") if finished else "-",
            "batches as reference": "yes" if same_batches else "no",
            "max abs Δw vs reference (resume point / end)": f"{_fmt_diff(diff_resume)} / {_fmt_diff(diff_end)}",
        },
    )
    row["details"] = {
        "wall_s": round(time.perf_counter() - t0, 1),
        "max_abs_weight_diff_at_resume_point": diff_resume,
        "max_abs_weight_diff_at_end": diff_end,
        "runs": [{k: v for k, v in r.items() if k not in ("records", "log_text")} for r in runs],
    }
    return row


def check_run(run: dict, n: int, every: int) -> list[str]:
    """What one process of a trial must have done, given how it was stopped."""
    where = f"run {n}"
    failures = []
    sig, rc, last = run["signal"], run["rc"], run["last_recorded"]
    if rc is None:
        return [f"{where} hung (killed after its time limit; log {run['log']})"]
    if sig is not None and run.get("sent_at") is None:
        return [f"{where} ended (exit {rc}) before step {run['target_step']}; log {run['log']}"]
    if n > 0 and run["records"] and run["records"][0]["step"] != run["resumed_from"] + 1:
        failures.append(f"{where} started at step {run['records'][0]['step']}, not {run['resumed_from'] + 1}")
    ckpt = run["checkpoint"]
    saved = ckpt["step"] if ckpt else 0
    if sig == "SIGTERM":
        if rc != 128 + signal.SIGTERM:
            failures.append(f"{where}: exit {rc} after SIGTERM, not 143")
        if saved != last or not run["sent_at"] <= last <= run["sent_at"] + 1:
            failures.append(f"{where}: SIGTERM after step {run['sent_at']}, last step {last}, last.ckpt at {saved}")
        summary = run["summary"] or {}
        if summary.get("stopped_by") != "SIGTERM" or (summary.get("checkpoint") or {}).get("step") != saved:
            failures.append(f"{where}: summary.json after SIGTERM: stopped_by {summary.get('stopped_by')!r}, "
                            f"checkpoint {summary.get('checkpoint')}")  # fmt: skip
        if run["lock_left"]:
            failures.append(f"{where}: .run.lock left after SIGTERM")
    elif sig == "SIGKILL":
        if rc != -signal.SIGKILL:
            failures.append(f"{where}: exit {rc} after SIGKILL, not -9")
        # Steps are checkpointed at multiples of `every` after they are recorded: the save of the last recorded
        # step may or may not have happened before the kill.
        expected = {every * (last // every)}
        if last % every == 0 and last > 0:
            expected.add(last - every)
        if saved not in expected:
            failures.append(f"{where}: SIGKILL after step {last}: last.ckpt at {saved}, expected {sorted(expected)}")
    elif rc != 0:
        failures.append(f"{where}: exit {rc}: {error_line(run['log_text'])}")
    return failures


def check_trial(runs: list[dict], plan: Plan, ref_steps: dict) -> list[str]:
    failures = []
    for n in range(1, len(runs)):
        if (
            runs[n - 1]["signal"] == "SIGKILL"
            and "taking over the lock of a run that is no longer alive" not in (runs[n]["log_text"])
        ):
            failures.append(f"run {n}: no warning about taking over the killed run's lock")
    final = runs[-1]
    if final["rc"] != 0:
        return [*failures, f"the trial did not finish (exit codes {[r['rc'] for r in runs]})"]
    ckpt, summary = final["checkpoint"], final["summary"] or {}
    if not ckpt or ckpt["step"] != plan.max_steps:
        failures.append(f"final last.ckpt at step {ckpt and ckpt['step']}, not {plan.max_steps}")
    if summary.get("steps") != plan.max_steps or (summary.get("checkpoint") or {}).get("step") != plan.max_steps:
        failures.append(f"summary.json: steps {summary.get('steps')}, checkpoint {summary.get('checkpoint')}")
    if summary.get("stopped_by") is not None:
        failures.append(f"summary.json: stopped_by {summary.get('stopped_by')!r} after the last run")
    if final["lock_left"]:
        failures.append(".run.lock left after the run finished")
    return failures


def run_concurrent(runner: Runner, ref_steps: dict[int, list[str]]) -> dict:
    """A second run in the folder of a running one. The first saves only at its end (every_n 10**6), so that its
    ``last.ckpt`` is the end-of-epoch checkpoint written by the run's end, which the batch-size case uses."""
    plan, root = runner.plan, runner.work / "concurrent"
    t0 = time.perf_counter()
    failures = []
    # The first run waits after its first step until the second has been refused: under load a 12-step run could
    # otherwise end before the second one even starts, and the second would then rightly find the folder free.
    release = runner.work / "concurrent.release"
    hold = {"class_path": WAIT_FOR_FILE, "init_args": {"path": str(release), "at_step": 1}}
    first_args = [*runner.args(root, every=10**6), "--trainer.callbacks+", json.dumps(hold)]
    first, first_log = runner.start("concurrent-first", first_args)
    second_rc = second_s = None
    try:
        if wait_for_step(first, root / KEYS_FILE, 1, plan.timeout(1)) is None:
            failures.append(f"the first run ended before its first step (log {first_log})")
        else:
            config_before = (root / "config.yaml").read_text()
            t1 = time.perf_counter()
            second, second_log = runner.start("concurrent-second", runner.args(root, every=10**6))
            second_rc = finish(second, plan.start_timeout_s)
            second_s = round(time.perf_counter() - t1, 1)
            first_alive = first.poll() is None
            text = second_log.read_text(errors="replace")
            if second_rc != 2:
                failures.append(f"second run: exit {second_rc}, not 2 (log {second_log})")
            if "another run is using this run folder" not in text or f"PID {first.pid}" not in text:
                failures.append(f"second run: no 'another run is using this run folder (PID {first.pid}' line")
            if not first_alive:
                failures.append("the first run ended before the second was refused: nothing was tested")
            if (root / "config.yaml").read_text() != config_before:
                failures.append("the second run rewrote config.yaml")
    finally:
        release.touch()
        first_rc = finish(first, plan.timeout(plan.max_steps))
    if first_rc != 0:
        failures.append(f"first run: exit {first_rc} (log {first_log})")
    steps = loss_steps(root)
    if steps != list(range(plan.max_steps)):
        failures.append(f"metrics.csv train/loss steps {steps}, not 0..{plan.max_steps - 1} once each")
    if (root / "metrics.part1.csv").exists() or (root / ".run.lock").exists():
        failures.append("metrics.part1.csv or .run.lock left in the folder")
    keys = {r["step"]: r["keys"] for r in read_keys(root / KEYS_FILE)}
    match = per_epoch(keys, plan) == per_epoch(ref_steps, plan)
    same = keys == ref_steps
    diff = max_weight_diff(root / "last.ckpt", runner.work / "reference" / "last.ckpt")
    if not match:
        failures.append("the samples of an epoch differ from the reference's")
    if diff != 0:  # the same seed, data and steps from the start: the runs are deterministic on CPU
        failures.append(f"weights differ from the reference's (max abs {_fmt_diff(diff)})")
    last = checkpoint_info(root / "last.ckpt")
    row = _row("concurrent run", failures, **{
        "exit codes": f"first {first_rc}, second {second_rc} after {second_s} s",
        "final step": last and last["step"],
        "samples per epoch match": "yes" if match else "no",
        "batches as reference": "yes" if same else "no",
        "max abs Δw vs reference (resume point / end)": f"- / {_fmt_diff(diff)}",
    })  # fmt: skip
    row["details"] = {"wall_s": round(time.perf_counter() - t0, 1), "second_run_s": second_s,
                      "max_abs_weight_diff_at_end": diff, "first_log": str(first_log)}  # fmt: skip
    return row


def run_batch_size_elastic(runner: Runner, source: Path, case: str, ref_steps: dict, all_keys: list[str]) -> dict:
    """Resume with another batch size from a checkpoint in the middle of the first epoch, to that epoch's end
    (elastic resume): the reference's steps up to the checkpoint and the resumed run's steps hold every sample of
    the epoch once."""
    plan, root = runner.plan, runner.work / _slug(case)
    root.mkdir(parents=True, exist_ok=True)
    failures = []
    info = checkpoint_info(source)
    if info is None:
        return _row(case, [f"no checkpoint {source}"])
    if info["epoch"] != 0 or info["batches_in_epoch"] in (0, plan.steps_per_epoch):
        failures.append(f"the checkpoint is not in the middle of the first epoch: {info}")
    shutil.copy2(source, root / "last.ckpt")
    left = len(all_keys) - info["batches_in_epoch"] * plan.batch_size
    target = info["step"] + -(-left // OTHER_BATCH_SIZE)  # the rest of the epoch in batches of the other size
    args = runner.args(root, max_steps=target, batch_size=OTHER_BATCH_SIZE, resume=True)
    proc, log = runner.start(_slug(case), args)
    rc = finish(proc, plan.timeout(target - info["step"]))
    records = read_keys(root / KEYS_FILE)
    if rc != 0:
        failures.append(f"exit {rc}, not 0: {error_line(log.read_text(errors='replace'))}")
    else:
        keys = [k for step in range(1, info["step"] + 1) for k in ref_steps[step]] + [
            k for r in records for k in r["keys"]
        ]
        if Counter(keys) != Counter(all_keys):
            failures.append("the epoch's samples before and after the resume are not every sample once")
    row = _row(case, failures, **{
        "resumed from": f"{info['step']} (epoch {info['epoch']}, batch {info['batches_in_epoch']})",
        "exit codes": str(rc),
        "final step": target,
    })  # fmt: skip
    row["details"] = {"log": str(log)}
    return row


def run_resume_from(runner: Runner, source: Path, case: str, batch_size: int, all_keys: list[str]) -> dict:
    """A copy of ``source`` (a checkpoint at the end of an epoch) as ``last.ckpt`` of a new folder, resumed with
    ``batch_size`` for 3 more steps: all accepted, 3 batches of ``batch_size`` distinct samples."""
    plan, root = runner.plan, runner.work / _slug(case)
    root.mkdir(parents=True, exist_ok=True)
    failures = []
    info = checkpoint_info(source)
    if info is None:
        return _row(case, [f"no checkpoint {source}"])
    if info["batches_in_epoch"] not in (0, plan.steps_per_epoch):
        failures.append(f"the checkpoint is not at the end of an epoch: {info}")
    shutil.copy2(source, root / "last.ckpt")
    target = info["step"] + 3
    proc, log = runner.start(_slug(case), runner.args(root, max_steps=target, batch_size=batch_size, resume=True))
    rc = finish(proc, plan.timeout(3))
    records = read_keys(root / KEYS_FILE)
    last = checkpoint_info(root / "last.ckpt")
    if rc != 0:
        failures.append(f"exit {rc}, not 0: {error_line(log.read_text(errors='replace'))}")
    else:
        keys = [k for r in records for k in r["keys"]]
        if [r["step"] for r in records] != list(range(info["step"] + 1, target + 1)):
            failures.append(f"steps trained: {[r['step'] for r in records]}")
        if any(len(r["keys"]) != batch_size for r in records) or len(set(keys)) != len(keys):
            failures.append("batches of the wrong size or a sample twice")
        if not set(keys) <= set(all_keys):
            failures.append("unknown sample keys")
        if not last or last["step"] != target or last["batch_size"] != batch_size:
            failures.append(f"last.ckpt after the resume: {last}")
    row = _row(case, failures, **{
        "resumed from": f"{info['step']} (epoch {info['epoch']}, batch {info['batches_in_epoch']})",
        "exit codes": str(rc),
        "final step": last and last["step"],
    })  # fmt: skip
    row["details"] = {"log": str(log)}
    return row


# ---- driver ---------------------------------------------------------------------------------------------------------
def make_data(folder: Path, plan: Plan) -> tuple[str, Path, list[str]]:
    """Shards, a tokenizer of their captions, and every sample key.

    The test suite's shards (``tests/shardkit.py``): square 96 px images. With ``train_scale [1.0, 1.0]`` the
    random crop of a square image is always the whole image; on the benchmark shards' non-square images (after
    the JPEG draft decode) about 1 in 7 crops still depends on the RNG (its rounding lets a crop one pixel short
    of a side through, at a random offset).
    """
    from data_prep.tokenizer import train_wordpiece
    from tests.shardkit import CLASSES, make_shards

    make_shards(folder, [plan.per_shard] * plan.shards, image_size=96)
    captions = [
        f"{caption} with a nodule on the {side}" for _, caption in CLASSES.values() for side in ("left", "right")
    ]
    train_wordpiece(captions, folder / "tokenizer", vocab_size=1000)  # < 4096: fits the tiny preset's embedding
    pattern = str(folder / f"train-{{000000..{plan.shards - 1:06d}}}.tar")
    return pattern, folder / "tokenizer", [f"train_{i:06d}" for i in range(plan.shards * plan.per_shard)]


def run_cases(work: Path, plan: Plan, trials: int, seed: int = 0, log=print) -> list[dict]:
    """Every case in ``work``; returns the rows (``outcome`` is ``pass`` or ``FAIL``)."""
    pattern, tokenizer, all_keys = make_data(work / "data", plan)
    runner = Runner(work, plan, pattern, tokenizer)

    def report(row: dict) -> dict:
        log(f"[faults] {row['case']}: {row['outcome']}" + (f" ({row['notes']})" if row["notes"] else ""))
        return row

    ref_row, ref_steps = run_reference(runner, all_keys)
    rows = [report(ref_row)]
    if ref_row["outcome"] != "pass":
        return rows  # nothing to compare with
    for i in range(trials):
        rows.append(report(run_trial(runner, f"trial {i}", random_faults(i, seed, plan), ref_steps)))
    rows.append(report(run_concurrent(runner, ref_steps)))
    ref, spe, other = work / "reference", plan.steps_per_epoch, OTHER_BATCH_SIZE
    change = f"batch size {plan.batch_size} -> {other}"
    mid = ref / f"step{plan.every:07d}.ckpt"
    rows.append(report(run_batch_size_elastic(runner, mid, f"{change}, mid-epoch", ref_steps, all_keys)))
    if spe % plan.every == 0:
        case = f"{change}, epoch end (periodic checkpoint)"
        rows.append(report(run_resume_from(runner, ref / f"step{spe:07d}.ckpt", case, other, all_keys)))
    # The concurrent run saved only at its end, which is the end of its last epoch.
    end = work / "concurrent" / "last.ckpt"
    rows.append(report(run_resume_from(runner, end, f"{change}, epoch end (run end)", other, all_keys)))
    rows.append(report(run_resume_from(runner, end, "3 more steps after the run end", plan.batch_size, all_keys)))
    # A SIGTERM at an epoch's last step when that step is no periodic checkpoint: last.ckpt is written at the
    # run's end, after the epoch was closed (like the run end above), not by the periodic save.
    every = next(e for e in range(plan.every + 1, spe + 2) if spe % e)
    case = f"SIGTERM at epoch end (every_n_train_steps {every})"
    rows.append(report(run_trial(runner, case, [(signal.SIGTERM, spe)], ref_steps, every=every)))
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench faults", description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10, help="SIGTERM/SIGKILL trials (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault steps (default 0)")
    parser.add_argument("--per-shard", type=int, default=24, help="samples per shard, 2 shards (default 24)")
    parser.add_argument(
        "--random-crops",
        action="store_true",
        help="the config's random crops: weight differences to the reference are reported, not checked",
    )
    parser.add_argument("--keep", action="store_true", help="keep the run folders and logs")
    parser.add_argument("--work", type=Path, default=None, help="folder for data, runs and logs (default: a temp)")
    args = parser.parse_args(argv)

    plan = Plan(per_shard=args.per_shard, random_crops=args.random_crops)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_faults_"))
    work.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    busy0, t0 = busy_cpu_seconds(), time.perf_counter()
    own0 = _own_cpu_seconds()
    rows = run_cases(work, plan, args.trials, args.seed)
    wall = time.perf_counter() - t0
    # Cores kept busy by other processes meanwhile: on a shared machine the timings mean little without it.
    info["foreign_cores"] = round((busy_cpu_seconds() - busy0 - (_own_cpu_seconds() - own0)) / wall, 2)
    info["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    failed = [r["case"] for r in rows if r["outcome"] != "pass"]
    table = markdown_table(HEADERS, [[_short(r[h]) for h in HEADERS] for r in rows])
    result = {
        "benchmark": "faults",
        "command": "python -m bench faults " + " ".join(argv),
        "machine": info,
        "plan": {**asdict(plan), "steps_per_epoch": plan.steps_per_epoch, "max_steps": plan.max_steps},
        "trials": args.trials,
        "seed": args.seed,
        "wall_s": round(wall, 1),
        "failed": failed,
        "rows": rows,
        "table": table,
        "work": str(work) if failed or args.keep else None,
    }
    path = write_result("faults", result)
    print(table)
    print(f"\n{len(rows) - len(failed)} of {len(rows)} cases passed in {wall:.0f} s "
          f"(other processes kept {info['foreign_cores']} cores busy); {path}")  # fmt: skip
    if failed or args.keep:
        print(f"run folders and logs: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    if failed:
        raise SystemExit(1)


def _short(cell, limit: int = 240):
    """Table cells stay readable; the JSON keeps the whole notes."""
    return cell[: limit - 3] + "..." if isinstance(cell, str) and len(cell) > limit else cell


def _own_cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
