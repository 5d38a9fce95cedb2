"""Callbacks of every run: throughput and the run summary, progress in steps, periodic zero-shot/retrieval
evaluation, a stop of all ranks on SIGTERM/SIGUSR1; and the checkpoint writer that never leaves a half-written file in
place of a good one."""

from __future__ import annotations

import datetime
import json
import math
import os
import resource
import sys
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from medclip_train.atomic_files import AtomicFile


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
        # Logged on logging steps only: self.log turns a Python float into a host-to-device copy (a sync on CUDA).
        if len(self.times) >= 2 and trainer._logger_connector.should_update_logs:
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
            "checkpoint": _last_checkpoint(trainer),
            "stopped_by": next((cb.stopped_by for cb in trainer.callbacks if isinstance(cb, Preemption)), None),
        }
        os.makedirs(trainer.default_root_dir, exist_ok=True)
        with open(os.path.join(trainer.default_root_dir, self.filename), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)


class StepProgress(ProgressBar):
    """Progress in optimizer steps, on stdout: ``step 120/300  loss 1.2345  samples/s 195.6  elapsed 0:00:40
    eta 0:01:00``.

    On a terminal the line is a bar redrawn in place; otherwise (a log file, a pipe, a SLURM job) it is printed as a
    plain line every ``every_n_steps`` steps (default: ``trainer.log_every_n_steps``) and at the last step. A line
    after each validation gives its loss. Lightning's own bar counts batches per epoch (``Epoch 2/-2`` in a run
    bounded by ``max_steps``) and writes nothing useful to a file.

    Per step only host-side clocks are read; the loss (a device tensor) is read when a line is written, and on a
    terminal at most twice a second.
    """

    def __init__(self, every_n_steps: int | None = None, refresh_s: float = 0.5):
        super().__init__()
        self.every_n_steps = every_n_steps
        self.refresh_s = refresh_s
        self._enabled = True
        self._bar = None
        self._rate_window: list[tuple[float, int]] = []  # (time, samples so far in this run), the last 20 steps
        self._samples = 0
        self._start = (0.0, 0)  # (time, global step) when this run started training
        self._total: int | None = None
        self._last_refresh = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args, **kwargs) -> None:
        if self._bar is not None:  # above the bar, which tqdm redraws below
            from tqdm import tqdm

            tqdm.write(" ".join(map(str, args)), file=sys.stdout)
        else:
            print(*args, **kwargs)

    def total_steps(self, trainer) -> int | None:
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return trainer.max_steps
        estimated = trainer.estimated_stepping_batches  # max_epochs x batches per epoch
        return int(estimated) if math.isfinite(estimated) else None

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = (time.perf_counter(), trainer.global_step)
        self._rate_window = [(self._start[0], 0)]
        self._samples = 0
        self._total = self.total_steps(trainer)
        if self._enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self._bar = tqdm(
                total=self._total,
                initial=trainer.global_step,
                file=sys.stdout,
                dynamic_ncols=True,
                bar_format="step {n_fmt}/{total_fmt} {bar} {desc}  elapsed {elapsed}  eta {remaining}",
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        self._samples += batch["image"].shape[0] * trainer.world_size
        self._rate_window = [*self._rate_window[-20:], (now, self._samples)]
        if not self._enabled:
            return
        step, total = trainer.global_step, self._total
        if self._bar is not None:
            if now - self._last_refresh >= self.refresh_s or step == total:
                self._last_refresh = now
                self._bar.set_description_str(self._figures(trainer), refresh=False)  # drawn by update()
            self._bar.update(step - self._bar.n)
            return
        every = self.every_n_steps or trainer.log_every_n_steps or 1
        if step % every == 0 or step == total:
            print(f"step {step}/{total or '?'}  {self._figures(trainer)}  {self._times(step, total, now)}", flush=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._enabled or trainer.sanity_checking:
            return
        losses = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        figures = "  ".join(f"{k} {_scalar(v):.4f}" for k, v in sorted(losses.items()))
        self.print(f"validation at step {trainer.global_step}: {figures or 'no metrics'}", flush=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _figures(self, trainer) -> str:
        loss = trainer.progress_bar_metrics.get("train/loss")
        (t0, n0), (t1, n1) = self._rate_window[0], self._rate_window[-1]
        rate = (n1 - n0) / (t1 - t0) if t1 > t0 else None
        loss_text = "?" if loss is None else f"{_scalar(loss):.4f}"
        return f"loss {loss_text}  samples/s {'?' if rate is None else f'{rate:.1f}'}"

    def _times(self, step: int, total: int | None, now: float) -> str:
        elapsed = now - self._start[0]
        done = step - self._start[1]
        eta = "?" if not total or done <= 0 else _duration(elapsed / done * max(total - step, 0))
        return f"elapsed {_duration(elapsed)}  eta {eta}"


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


def _last_checkpoint(trainer) -> dict | None:
    """The checkpoint this summary describes: the run's ``last.ckpt`` as saved at the end, with its step."""
    cb = trainer.checkpoint_callback
    if cb is None or not getattr(cb, "last_model_path", ""):
        return None
    return {"path": os.path.abspath(cb.last_model_path), "step": int(cb._last_global_step_saved)}


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` always holds the final step of a run that ends normally, and that
    mirrors the run to ``remote_dir`` (object storage) when one is given.

    Lightning writes ``last.ckpt`` at train end only when no last checkpoint was written during the run, so with
    ``max_steps`` not a multiple of ``every_n_train_steps`` the steps after the last periodic save were lost.
    """

    def __init__(self, *args, remote_dir: str | None = None, **kwargs):
        """
        Args:
            remote_dir: Also upload each checkpoint (once per step) to this fsspec URL (``s3://bucket/runs/NAME``),
                then ``latest.json`` naming it, then ``config.yaml``, ``metrics*.csv`` and ``summary.json``;
                ``--ckpt_path last`` resumes from there when it is newer than the local run folder.
        """
        super().__init__(*args, **kwargs)
        self.remote_dir = remote_dir
        self._remote = None
        self._uploaded_step: int | None = None

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_end(trainer, pl_module)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        # The step checkpoint and last.ckpt of one step hold the same state: one upload per step.
        if self.remote_dir and trainer.is_global_zero and self._uploaded_step != trainer.global_step:
            self._uploaded_step = trainer.global_step
            self._sync(trainer, filepath)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        # After on_fit_end, so summary.json is written; loggers are finalised after this hook, so flushed here.
        if self.remote_dir and trainer.is_global_zero and stage == "fit":
            for logger in trainer.loggers:
                logger.save()
            self._sync(trainer, None)

    def _sync(self, trainer, checkpoint: str | None) -> None:
        """Upload ``checkpoint`` (then the manifest), then the run's small files. A failed upload is a warning:
        the local checkpoint is whole, the remote manifest still names the previous complete one, and the next
        checkpoint tries again."""
        from medclip_train.data.sources import redact
        from medclip_train.remote import RemoteRunDir

        try:
            self._remote = self._remote or RemoteRunDir(self.remote_dir)
            if checkpoint is not None:
                self._remote.upload_checkpoint(checkpoint, trainer.global_step)
            self._remote.upload_run_files(trainer.default_root_dir)
        except Exception as err:  # noqa: BLE001 - network, credentials, quota: training goes on
            where = self._remote.where() if self._remote else "checkpoint.remote_dir"
            what = f"step {trainer.global_step}" if checkpoint else "the run files"
            print(
                f"warning: {where}: upload of {what} failed ({type(err).__name__}: {redact(str(err))})", file=sys.stderr
            )


class Preemption(L.Callback):
    """Preemption and time limits: SIGTERM, and SLURM's warning signal (``#SBATCH --signal=USR1@120``).

    Every rank stops after the same step and ``last.ckpt`` is saved once, by the normal end of the run
    (``RunCheckpoint``), with all ranks in its collectives. Lightning's own SIGTERM handler runs a broadcast
    inside the signal handler and raises on the rank that got the signal; a rank that saw it first then waited in
    the checkpoint's barrier while the others ran the next step's collectives, until the process-group timeout,
    and nothing was saved. Here the handler only sets a flag; after each step the ranks agree on it with one
    small all-reduce (MAX), so a signal to any one rank stops them all at that step boundary.

    After SIGUSR1 under SLURM the job is requeued (``scontrol requeue``); the job script resumes with
    ``--ckpt_path last``. The CLI exits with 128 + the signal number, so that a script sees the run did not finish.
    """

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        self.received: int | None = None
        self.stopped_by: str | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def on_train_start(self, trainer, pl_module) -> None:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handler)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        received = self.received or 0
        if trainer.world_size > 1:
            import torch.distributed as dist

            flag = torch.tensor([received], device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            received = int(flag.item())
        if received and not self.stopped_by:
            import signal

            self.stopped_by = signal.Signals(received).name
            trainer.should_stop = True

    def teardown(self, trainer, pl_module, stage: str) -> None:
        import signal

        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def exit_code(self) -> int | None:
        import signal

        return 128 + int(getattr(signal, self.stopped_by)) if self.stopped_by else None

    def requeue(self, is_global_zero: bool) -> None:
        """``scontrol requeue`` of this SLURM job after SIGUSR1 (rank zero only)."""
        job = os.environ.get("SLURM_JOB_ID")
        if self.stopped_by != "SIGUSR1" or not job or not is_global_zero:
            return
        if os.environ.get("SLURM_ARRAY_JOB_ID"):
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        import subprocess

        result = subprocess.run(["scontrol", "requeue", job], check=False)
        print(f"SLURM job {job} {'requeued' if result.returncode == 0 else 'could not be requeued'}", file=sys.stderr)


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
        with AtomicFile(path, "wb", unique=True) as f:  # .NAME.XXXX.tmp, which run_dir clears after a kill
            torch.save(checkpoint, f)


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
        """Evaluation during training (--eval.*): results go to the logger and ``summary.json``.

        Args:
            zeroshot_tasks: Zero-shot classification folders (``medclip-eval zeroshot --data`` accepts the same).
            retrieval_shards: Shard pattern of image-text pairs for retrieval R@k.
            every_n_steps: Evaluate every this many optimizer steps (0: not during training).
            at_start: Also evaluate before the first step (``eval_before`` in ``summary.json``, for fine-tuning).
            at_end: Evaluate after the last step.
            max_samples: Images per task and retrieval pairs evaluated at most.
            batch_size: Batch size of the evaluation.
        """
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
        # The weights, and their moving average when the run keeps one (model.ema_decay): metrics "ema/<name>".
        models = {"": pl_module.model}
        if getattr(pl_module, "ema", None) is not None:
            models["ema/"] = pl_module.ema.module
        metrics = {}
        for prefix, model in models.items():
            was_training = model.training
            model.eval()
            if trainer.is_global_zero:
                found = evaluate_suite(
                    model,
                    pl_module.tokenizer,
                    preprocess,
                    zeroshot_tasks=self.zeroshot_tasks,
                    retrieval_shards=self.retrieval_shards,
                    device=pl_module.device,
                    batch_size=self.batch_size,
                    max_samples=self.max_samples,
                )
                metrics.update({prefix + k: v for k, v in found.items()})
            model.train(was_training)
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
