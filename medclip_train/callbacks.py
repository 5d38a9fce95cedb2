"""Callbacks of every run: throughput and the run summary, periodic zero-shot/retrieval evaluation, checkpoint on
SIGTERM; and the checkpoint writer that never leaves a half-written file in place of a good one."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import tempfile
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux; children (loader workers) counted separately and added.
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024.0


def _scalar(value) -> float | None:
    if value is None:
        return None
    return float(value.item() if isinstance(value, torch.Tensor) else value)


class RunSummary(L.Callback):
    """Shows samples/s in the progress bar and writes ``summary.json`` at the end of every run.

    Steady-state throughput leaves out the first ``warmup_steps`` steps (worker start-up, allocator warm-up).
    Only host-side clocks are read per step, so the training loop gets no extra device sync.
    """

    def __init__(self, warmup_steps: int = 5, filename: str = "summary.json"):
        self.warmup_steps = warmup_steps
        self.filename = filename
        self.times: list[float] = []
        self.samples: list[int] = []
        self.start = None
        self.eval_metrics: dict[str, float] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()
        self.first_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self.times.append(now)
        self.samples.append(batch["image"].shape[0] * trainer.world_size)
        if len(self.times) >= 2:
            window = min(len(self.times) - 1, 20)
            rate = sum(self.samples[-window:]) / max(now - self.times[-window - 1], 1e-9)
            pl_module.log("samples_per_s", rate, prog_bar=True, rank_zero_only=True)

    def steady_samples_per_s(self) -> float | None:
        skip = min(self.warmup_steps, max(len(self.times) - 2, 0))
        if len(self.times) - skip < 2:
            return None
        return sum(self.samples[skip + 1 :]) / (self.times[-1] - self.times[skip])

    @rank_zero_only
    def on_fit_end(self, trainer, pl_module) -> None:
        # on_fit_end runs after every callback's on_train_end, so the final evaluation is in by now.
        metrics = trainer.callback_metrics
        eval_metrics = {k: _scalar(v) for k, v in metrics.items() if k.startswith("eval/")}
        eval_before = {}
        for cb in trainer.callbacks:
            eval_metrics.update({f"eval/{k}": v for k, v in getattr(cb, "last_metrics", {}).items()})
            eval_before.update({f"eval/{k}": v for k, v in getattr(cb, "start_metrics", {}).items()})
        summary = {
            "steps": trainer.global_step,
            "steps_this_run": trainer.global_step - self.first_step,
            "samples_seen": int(pl_module.samples_seen.item()),
            "wall_s": round(time.perf_counter() - self.start, 2) if self.start else None,
            "steady_samples_per_s": self.steady_samples_per_s(),
            "peak_rss_mb": round(_peak_rss_mb(), 1),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
            "final_loss": _scalar(metrics.get("train/loss")),
            "final_val_loss": _scalar(metrics.get("val/loss")),
            "skipped_samples": int(pl_module.skipped_samples.item()),
            "skipped_steps": int(pl_module.skipped_steps.item()),
            "world_size": trainer.world_size,
            "precision": str(trainer.precision),
            "eval": eval_metrics,
            "eval_before": eval_before,
        }
        os.makedirs(trainer.default_root_dir, exist_ok=True)
        with open(os.path.join(trainer.default_root_dir, self.filename), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` always holds the final step of a run that ends normally.

    Lightning writes ``last.ckpt`` at train end only when no last checkpoint was written during the run, so with
    ``max_steps`` not a multiple of ``every_n_train_steps`` the steps after the last periodic save were lost.
    """

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_end(trainer, pl_module)


class CheckpointOnSigterm(L.Callback):
    """Saves ``last.ckpt`` when the run stops on SIGTERM (a cluster scheduler's preemption or time limit).

    Lightning 2.x only turns SIGTERM into ``SIGTERMException`` at the end of the current step and saves nothing
    (its SLURM requeue handler listens to SIGUSR1), so without this a preempted run would lose everything since
    its last periodic checkpoint. ``--ckpt_path last`` resumes from here.
    """

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        checkpoint = trainer.checkpoint_callback
        dirpath = getattr(checkpoint, "dirpath", None) or trainer.default_root_dir
        trainer.save_checkpoint(os.path.join(dirpath, "last.ckpt"))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a local checkpoint to a temporary file next to it, then renames it into place (``os.replace``).

    A crash or a full disk during the write leaves the previous checkpoint whole. Lightning's writer stages the
    file in the system temp folder and moves it; when that folder is on another filesystem than the checkpoints
    (node-local /tmp, checkpoints on shared storage) the move is a copy over the old file, and a failure during
    that copy leaves a truncated ``last.ckpt``. Remote paths (``s3://`` ...) keep Lightning's writer.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = str(path)
        if "://" in path:
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a checkpoint gets the usual permissions
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise


class EvalCallback(L.Callback):
    """Zero-shot classification and retrieval on small held-out sets, every N steps and at the end."""

    def __init__(
        self,
        zeroshot_tasks: list[str] | None = None,
        retrieval_shards: str | None = None,
        every_n_steps: int = 0,
        at_start: bool = False,
        at_end: bool = True,
        max_samples: int | None = 1000,
        batch_size: int = 64,
    ):
        self.zeroshot_tasks = list(zeroshot_tasks or [])
        self.retrieval_shards = retrieval_shards
        self.every_n_steps = every_n_steps
        self.at_start = at_start
        self.at_end = at_end
        self.start_metrics: dict[str, float] = {}
        self.max_samples = max_samples
        self.batch_size = batch_size
        self.last_metrics: dict[str, float] = {}

    def _enabled(self) -> bool:
        return bool(self.zeroshot_tasks or self.retrieval_shards)

    def _run(self, trainer, pl_module, log: bool = True) -> None:
        if not self._enabled():
            return
        from open_clip.transform import PreprocessCfg, image_transform_v2

        from medclip_train.evaluation.suite import evaluate_suite

        preprocess = image_transform_v2(PreprocessCfg(**pl_module.preprocess_cfg), is_train=False)
        was_training = pl_module.model.training
        pl_module.model.eval()
        metrics = {}
        if trainer.is_global_zero:
            metrics = evaluate_suite(
                pl_module.model,
                pl_module.tokenizer,
                preprocess,
                zeroshot_tasks=self.zeroshot_tasks,
                retrieval_shards=self.retrieval_shards,
                device=pl_module.device,
                batch_size=self.batch_size,
                max_samples=self.max_samples,
            )
        pl_module.model.train(was_training)
        self.last_metrics = {k: float(v) for k, v in metrics.items()}
        if log:
            for name, value in metrics.items():
                pl_module.log(f"eval/{name}", float(value), rank_zero_only=True)
        if trainer.logger is not None and metrics:
            trainer.logger.log_metrics({f"eval/{k}": float(v) for k, v in metrics.items()}, step=trainer.global_step)

    def on_train_start(self, trainer, pl_module) -> None:
        # Fine-tuning reports zero-shot before and after: the "before" figures land in summary.json too.
        if self.at_start:
            with torch.no_grad():
                self._run(trainer, pl_module, log=False)
            self.start_metrics, self.last_metrics = self.last_metrics, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end:
            with torch.no_grad():
                self._run(trainer, pl_module, log=False)  # self.log is not allowed in on_train_end
