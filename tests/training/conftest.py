"""Fixtures of the training tests: shards, a CLI runner (in-process or ``train.py`` subprocess), and test-only
callbacks that the CLI can load by class path (``tests.training.conftest.KeyRecorder``), also in a subprocess.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.shardkit import make_shards, shard_pattern

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = str(REPO / "configs" / "test_tiny.yaml")


# ---- test-only callbacks (importable in a train.py subprocess: PYTHONPATH is the repo root) --------------------------
class KeyRecorder(L.Callback):
    """Appends ``{"rank", "step", "keys"}`` per training batch to ``<default_root_dir>/keys-rank<R>.jsonl``."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        path = Path(trainer.default_root_dir) / f"keys-rank{trainer.global_rank}.jsonl"
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"rank": trainer.global_rank, "step": trainer.global_step, "keys": batch["key"]}) + "\n")
            f.flush()
            os.fsync(f.fileno())


def sigkill(proc) -> None:
    """SIGKILL a run started by :func:`train_py` and reap it."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


class SlowDown(L.Callback):
    """Sleeps before each step, so that a test can kill the run between two checkpoints without racing it.

    Before the step, not after it: Lightning saves a step's checkpoint in ``on_train_batch_end`` and logs the step's
    metrics row after that; a test that kills the run as soon as the checkpoint appears must find that row written.
    """

    def __init__(self, delay_s: float = 0.5):
        self.delay_s = delay_s

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import time

        time.sleep(self.delay_s)


class WaitForFile(L.Callback):
    """After ``at_step`` steps, waits until ``path`` exists (at most ``timeout_s``): a test can then act on a run
    that is certainly still running, however loaded the machine, and let it go on by creating the file."""

    def __init__(self, path: str, at_step: int = 1, timeout_s: float = 300.0):
        self.path, self.at_step, self.timeout_s = path, at_step, timeout_s

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import time

        if trainer.global_step != self.at_step:
            return
        deadline = time.monotonic() + self.timeout_s
        while not os.path.exists(self.path) and time.monotonic() < deadline:
            time.sleep(0.1)


def _nan_total(loss_module, args, out: dict) -> dict:
    """Forward hook of a loss: its total (what is back-propagated) made NaN."""
    return {**out, "loss": out["loss"] * float("nan")}


class NaNLoss(L.Callback):
    """Makes the loss NaN at the given global steps (all steps if ``steps`` is None), as an fp16 overflow would.

    For every step it records whether the weights and the AdamW state came out of it unchanged.
    """

    def __init__(self, steps: list[int] | None = None):
        self.steps = steps
        self.unchanged: dict[int, bool] = {}
        self._hook = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step
        self._before = _snapshot(pl_module, trainer.optimizers[0])
        if self.steps is None or self._step in self.steps:
            self._hook = pl_module.loss.register_forward_hook(_nan_total)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._remove_hook()
        after = _snapshot(pl_module, trainer.optimizers[0])
        same = len(self._before) == len(after) and all(torch.equal(a, b) for a, b in zip(self._before, after))
        self.unchanged[self._step] = same

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._remove_hook()

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


class InitialWeights(L.Callback):
    """Keeps a copy of the model's weights as training starts."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


def _snapshot(pl_module, optimizer) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in pl_module.model.parameters()]
    for state in optimizer.state.values():
        tensors += [v.detach().clone() for v in state.values() if isinstance(v, torch.Tensor)]
    return tensors


class SendSigterm(L.Callback):
    """Sends SIGTERM to this process after ``at_step`` steps, as a cluster scheduler does before a preemption."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), signal.SIGTERM)


def callback_arg(cls: type, **init_args) -> str:
    """``--trainer.callbacks+=`` value for a callback class with its init arguments."""
    return json.dumps({"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args})


# ---- runs ------------------------------------------------------------------------------------------------------------
def bare_trainer(**kwargs) -> L.Trainer:
    """A one-step CPU ``Trainer`` that writes nothing (no logger, checkpoints, progress bar or summary)."""
    defaults = {
        "max_steps": 1,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return L.Trainer(**{**defaults, **kwargs})


def fit_args(tokenizer: Path, pattern: str, root: Path, *extra: str) -> list[str]:
    """``fit`` arguments of a tiny run on ``pattern`` into ``root``."""
    head = ["fit", "--config", TINY_CONFIG, "--model.clip.tokenizer", str(tokenizer)]
    return [*head, "--data.train", json.dumps([{"shards": pattern}]), "--trainer.default_root_dir", str(root), *extra]


def run_cli(args: list[str]):
    """The CLI in this process (no interpreter start-up: about 10 s less than a ``train.py`` subprocess)."""
    from medclip_train.cli import cli_main

    return cli_main(args)


def train_py(args: list[str], log: Path | None = None, **popen_kwargs) -> subprocess.Popen:
    """``python train.py ARGS`` as a subprocess with the repo on ``PYTHONPATH``; its output goes to ``log`` (a file,
    so that a long-running child never blocks on a full pipe) or, without one, to pipes for ``communicate()``."""
    command = [sys.executable, str(REPO / "train.py"), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    if log is None:
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        return subprocess.Popen(command, cwd=REPO, env=env, text=True, **pipes, **popen_kwargs)
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, **popen_kwargs)


def read_summary(root: Path) -> dict:
    return json.loads((root / "summary.json").read_text())


def read_metrics(root: Path, column: str = "train/loss") -> list[dict]:
    """Rows of ``metrics.csv`` that carry ``column``, as dicts."""
    with open(root / "metrics.csv", newline="") as f:
        return [row for row in csv.DictReader(f) if row.get(column)]


def read_keys(root: Path, rank: int = 0) -> list[dict]:
    path = root / f"keys-rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# ---- fixtures --------------------------------------------------------------------------------------------------------
@pytest.fixture
def shards(tmp_path):
    """``shards(sizes, **make_shards_kwargs) -> pattern`` in a fresh folder under ``tmp_path``."""
    count = iter(range(1000))

    def make(sizes: list[int], **kwargs) -> str:
        return shard_pattern(make_shards(tmp_path / f"shards{next(count)}", sizes, image_size=64, **kwargs))

    return make


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    """The tiny preset's tokenizer object, for data-module tests that build no model."""
    from medclip_train.config import ModelConfig
    from medclip_train.model.factory import build_tokenizer, resolve_open_clip_cfg

    model_cfg, _ = resolve_open_clip_cfg(ModelConfig(preset="tiny", tokenizer=str(tiny_tokenizer_dir)))
    return build_tokenizer(model_cfg)


@pytest.fixture
def tok(tiny_tokenizer_dir) -> Path:
    return tiny_tokenizer_dir
