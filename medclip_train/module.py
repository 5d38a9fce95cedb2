"""``CLIPModule``: the one training loop (pretraining, fine-tuning and the demo are configs of it).

Manual optimisation, because a contrastive loss needs two things automatic optimisation cannot give:

* exact accumulation: a batch of k x B is contrasted as a whole. Features of all k micro-batches are computed
  without grad, the loss and its gradient w.r.t. the features are taken over the full batch, then each micro-batch
  is re-forwarded with grad and back-propagated with its slice of that gradient (GradCache, as open_clip's
  ``accum_freq``). Lightning's ``accumulate_grad_batches`` would contrast each micro-batch only with itself.
* a real skip of non-finite steps: the gradients are dropped before AdamW sees them (its state is untouched),
  the skip is counted, and after ``max_consecutive_skips`` the run stops with advice.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, replace

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from medclip_train.config import LossConfig, ModelConfig, OptimConfig, check_objective
from medclip_train.data.pixels import normalize_pixels
from medclip_train.hardware import cpu_bf16_warning
from medclip_train.losses import build_loss
from medclip_train.model.dropout import use_cpu_dropout
from medclip_train.model.factory import build_model, set_fused_attention
from medclip_train.model.weights import EMA_PREFIX, MODEL_PREFIX
from medclip_train.optim import build_optimizer


class NonFiniteLossError(RuntimeError):
    pass


# The defaults as instances, not None: jsonargparse then lists every field as its own option with its docstring in
# `train.py fit --help` (`--model.clip.preset` ...); an optional dataclass is one opaque `--model.clip` option. The
# configs are never mutated, so sharing one default instance is safe.
_DEFAULT_CLIP, _DEFAULT_LOSS, _DEFAULT_OPTIM = ModelConfig(), LossConfig(), OptimConfig()


class CLIPModule(L.LightningModule):
    def __init__(
        self,
        clip: ModelConfig = _DEFAULT_CLIP,
        loss: LossConfig = _DEFAULT_LOSS,
        optim: OptimConfig = _DEFAULT_OPTIM,
        accumulation_steps: int = 1,
        grad_clip_norm: float = 1.0,
        max_consecutive_skips: int = 10,
        ema_decay: float = 0.0,
    ):
        """The model and how it trains (--model.*).

        Args:
            clip: The CLIP model: preset, towers, weights, locking.
            loss: The objective: InfoNCE, semantic matching weight, SigLIP.
            optim: AdamW and the learning-rate schedule.
            accumulation_steps: Exact contrastive accumulation: the data batch is split into this many
                micro-batches for memory, and the update equals one step on the whole batch.
            grad_clip_norm: Clip the global gradient norm to this (0 disables).
            max_consecutive_skips: Stop after this many consecutive steps with a non-finite loss or gradient.
            ema_decay: Keep an exponential moving average of the weights with this decay per optimizer step (e.g.
                0.9999; 0: none). It lives on the model's device, is saved in checkpoints, evaluated beside the
                weights by the in-training evaluation (``eval/ema/*``) and exported with ``medclip-export --ema``.
        """
        super().__init__()
        clip, loss, optim = clip or ModelConfig(), loss or LossConfig(), optim or OptimConfig()
        if accumulation_steps < 1:
            raise ValueError(f"model.accumulation_steps must be >= 1, got {accumulation_steps}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"model.ema_decay must be in [0, 1) (0: no moving average), got {ema_decay}")
        check_objective(clip, loss)
        self.automatic_optimization = False
        # Plain dicts, so that checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "clip": asdict(clip),
                "loss": asdict(loss),
                "optim": asdict(optim),
                "accumulation_steps": accumulation_steps,
                "grad_clip_norm": grad_clip_norm,
                "max_consecutive_skips": max_consecutive_skips,
                "ema_decay": ema_decay,
            }
        )
        self.clip_cfg, self.loss_cfg, self.optim_cfg = clip, loss, optim
        built = build_model(clip)
        self.model = built.model
        self.tokenizer = built.tokenizer
        self.model_cfg = built.model_cfg
        self.preprocess_cfg = built.preprocess_cfg
        self.loss = build_loss(loss)
        self.accumulation_steps = accumulation_steps
        self.grad_clip_norm = grad_clip_norm
        self.max_consecutive_skips = max_consecutive_skips
        self.register_buffer("skipped_samples", torch.zeros((), dtype=torch.long), persistent=True)
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long), persistent=True)
        self.register_buffer("samples_seen", torch.zeros((), dtype=torch.long), persistent=True)
        self.register_buffer("consecutive_skips", torch.zeros((), dtype=torch.long), persistent=False)
        # Built once and moved with the module: no host-to-device copy of the constants in every step.
        for name in ("mean", "std"):
            value = torch.tensor(self.preprocess_cfg[name], dtype=torch.float32)
            self.register_buffer(f"pixel_{name}", value, persistent=False)
        self.ema = ema_model(self.model, ema_decay) if ema_decay else None
        self._consecutive_skips = 0
        self._unsharded_params: list[torch.nn.Parameter] | None = None  # set when FSDP2 shards the model

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The open_clip config the model was built with: a later version whose preset builds something else is
        # refused on resume and on loading (factory.preset_drift), instead of loading the weights into it silently.
        checkpoint["architecture"] = {"model_cfg": self.model_cfg, "preprocess_cfg": dict(self.preprocess_cfg)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # model.ema_decay may be turned on or off on resume: a checkpoint without an average starts one from its
        # weights (as at step 0); an average this run does not keep is dropped. Either way it is said.
        state = checkpoint.get("state_dict")
        if state is None:  # ModelParallelStrategy (FSDP2) loads the weights itself; EMA is refused there
            return
        has_ema = any(k.startswith(EMA_PREFIX) for k in state)
        if self.ema is not None and not has_ema:
            rank_zero_warn("model.ema_decay: the checkpoint has no moving average; it starts from its weights now")
            for name, value in self.ema.module.state_dict().items():
                state[EMA_PREFIX + name] = state.get(MODEL_PREFIX + name, value)
            state["ema.n_averaged"] = torch.zeros_like(self.ema.n_averaged)  # the next update copies the weights
        elif self.ema is None and has_ema:
            rank_zero_warn("model.ema_decay is 0 in this run: the checkpoint's moving average is dropped")
            for key in [k for k in state if k.startswith("ema.")]:
                del state[key]

    # ---- data side (the data module is handed tokenizer and preprocess_cfg once: WebDataModule.connect) ---------
    def forward(self, image: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model(image, text)

    def images(self, batch: dict) -> torch.Tensor:
        """The batch's images as model input: uint8 pixels from the loader are normalised here, on the device.

        Normalised in float32, then cast to the parameters' dtype: under ``trainer.precision=bf16-true`` the weights
        are bf16 and Lightning converts only the batch's float tensors, not these uint8 pixels.
        """
        images = normalize_pixels(batch["image"], self.pixel_mean.float(), self.pixel_std.float())
        return images.to(self.model.logit_scale.dtype)

    # ---- sharding ----------------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """FSDP2 under Lightning's ``ModelParallelStrategy``: the CLIP model's parameters are sharded over the ranks
        (``fully_shard``); other strategies leave the model as it is.

        The scalar parameters (``logit_scale``, ``logit_bias``: open_clip's shapes, kept so that exports load there)
        cannot be sharded: they stay whole on every rank, and ``_clip_gradients`` averages their gradients as DDP
        would. The whole model is one FSDP unit: parameters are gathered for the forward and freed after it.
        """
        mesh = self.device_mesh  # set by ModelParallelStrategy only
        if mesh is not None and self.ema is not None:
            raise ValueError(
                "model.ema_decay is not supported with ModelParallelStrategy (FSDP2) yet: the average would be a whole "
                "unsharded copy on every rank; use --trainer.strategy ddp or model.ema_decay 0"
            )
        if mesh is None or self._unsharded_params is not None:
            return
        if mesh["tensor_parallel"].size() != 1:
            raise ValueError(
                "trainer.strategy: ModelParallelStrategy here shards over data-parallel ranks only (no tensor-"
                f"parallel plan), got tensor_parallel_size={mesh['tensor_parallel'].size()}; pass "
                "--trainer.strategy.data_parallel_size <number of processes> --trainer.strategy.tensor_parallel_size 1"
            )
        from torch.distributed.fsdp import fully_shard

        self._unsharded_params = [p for p in self.model.parameters() if p.dim() == 0]
        fully_shard(self.model, mesh=mesh["data_parallel"], ignored_params=set(self._unsharded_params))

    def _clip_gradients(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip to ``max_norm`` the norm of the gradient over all ranks; returns that norm (the same on every rank,
        so that every rank skips a non-finite step or none does)."""
        if self._unsharded_params is None:
            return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        # FSDP2: sharded gradients are DTensors, whose norm is reduced over the ranks; the unsharded scalars' are
        # plain per-rank tensors, averaged here. clip_grad_norm_ takes one kind or the other, not both.
        import torch.distributed as dist

        unsharded = {id(p) for p in self._unsharded_params}
        whole = [p for p in params if id(p) in unsharded]
        for p in whole:
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()
        norms = [torch.nn.utils.get_total_norm([p.grad for p in whole])] if whole else []
        sharded = [p.grad for p in params if id(p) not in unsharded]
        if sharded:
            norm = torch.nn.utils.get_total_norm(sharded, foreach=True)
            norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros((), device=self.device)
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for p in params:  # on the local shard of a DTensor: the same factor on every rank
            (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).mul_(scale)
        return total

    # ---- training ----------------------------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        if self.device.type == "cpu":  # explicit attention and cheaper dropout masks are faster there (see both)
            set_fused_attention(self.model, False)
            use_cpu_dropout(self.model)
            slow = cpu_bf16_warning(self.trainer.precision)
            if slow:
                rank_zero_warn(slow)

    def _loss(self, out: dict, labels: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total to back-propagate and the named, detached parts to log."""
        result = self.loss(out, labels)
        return result["loss"], {name: value for name, value in result.items() if name != "loss"}

    def _forward_backward(self, batch: dict):
        images, text, labels = self.images(batch), batch["text"], batch.get("labels")
        k = min(self.accumulation_steps, images.shape[0])
        if k == 1:
            loss, parts = self._loss(self.model(images, text), labels)
            self._backward(loss)
            return loss.detach(), parts
        return self._grad_cache_backward(images, text, labels, k)

    def _backward(self, loss: torch.Tensor) -> None:
        # Lightning runs training_step, and so this backward, under its autocast context. PyTorch's AMP guidance is to
        # autocast the forward and loss only (open_clip does); a backward under autocast re-dispatches its ops through
        # autocast and was 8% slower per step on CPU (bench model, 3 alternating pairs: 24.3 vs 22.5 samples/s).
        with torch.autocast(self.device.type, enabled=False):
            self.manual_backward(loss)

    def _grad_cache_backward(self, images, text, labels, k: int):
        # tensor_split, not chunk: chunk(k) gives fewer than k chunks when k does not divide B well (6 samples in 4
        # gives 3 of 2), and then no micro-batch was the last one: all ran under no_sync and DDP reduced nothing.
        image_chunks, text_chunks = images.tensor_split(k), text.tensor_split(k)
        n_parts = len(image_chunks)
        rng_states, feats = [], []
        with torch.no_grad():
            for ic, tc in zip(image_chunks, text_chunks):
                rng_states.append(_rng_state(ic.device))
                feats.append(self.model(ic, tc))
        cached = {
            key: torch.cat([f[key] for f in feats]).requires_grad_() for key in ("image_features", "text_features")
        }
        cached["logit_scale"] = feats[0]["logit_scale"].detach().requires_grad_()
        if "logit_bias" in feats[0]:
            cached["logit_bias"] = feats[0]["logit_bias"].detach().requires_grad_()
        with torch.enable_grad():
            loss, parts = self._loss(cached, labels)
        leaves = list(cached.values())
        grads = dict(zip(cached.keys(), torch.autograd.grad(loss, leaves)))
        offset = 0
        no_sync = getattr(self.trainer.model, "no_sync", None) if self._trainer is not None else None
        for i, (ic, tc) in enumerate(zip(image_chunks, text_chunks)):
            _set_rng_state(rng_states[i], ic.device)  # same dropout masks as the cached forward
            out = self.model(ic, tc)
            rows = slice(offset, offset + ic.shape[0])
            offset += ic.shape[0]
            surrogate = (out["image_features"] * grads["image_features"][rows]).sum()
            surrogate = surrogate + (out["text_features"] * grads["text_features"][rows]).sum()
            # The scale's gradient is split evenly so that every micro-batch touches every parameter (DDP), over the
            # parts actually run, so that the shares add up to the whole gradient.
            surrogate = surrogate + out["logit_scale"].sum() * grads["logit_scale"].sum() / n_parts
            if "logit_bias" in out:
                surrogate = surrogate + out["logit_bias"].sum() * grads["logit_bias"].sum() / n_parts
            last = i == n_parts - 1  # DDP all-reduces the accumulated gradients in this backward only
            ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
            with ctx:
                self._backward(surrogate)
        return loss.detach(), parts

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        result = {}

        def closure():
            result["loss"], result["parts"] = self._forward_backward(batch)
            return result["loss"]

        opt.step(closure=closure)  # the gradient check and clipping run in on_before_optimizer_step
        opt.zero_grad(set_to_none=True)
        scheduler = self.lr_schedulers()
        lr = scheduler.get_last_lr()[0]  # the LR this step used; after step() it is the next step's
        scheduler.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(self.optim_cfg.max_logit_scale))
        if self.ema is not None:
            # After the clamp: the average is of the weights the model runs with. A skipped (non-finite) step left
            # the weights as they were; the average then moves towards them as after any step.
            self.ema.update_parameters(self.model)
        self._log_step(batch, result["loss"], result["parts"], lr)
        return result["loss"]

    def on_before_optimizer_step(self, optimizer) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        max_norm = self.grad_clip_norm if self.grad_clip_norm > 0 else float("inf")
        grad_norm = self._clip_gradients(params, max_norm)
        self._last_grad_norm = grad_norm.detach()
        if optimizer.defaults.get("fused"):
            self._skip_on_device(optimizer, ~torch.isfinite(grad_norm))
            return
        if torch.isfinite(grad_norm):  # a host sync (other AdamW kernels cannot skip on the device)
            self._consecutive_skips = 0
            return
        for p in params:  # AdamW skips parameters without grad: state and weights stay untouched
            p.grad = None
        self.skipped_steps += 1
        self._consecutive_skips += 1
        self._check_consecutive_skips()

    def _check_consecutive_skips(self) -> None:
        if self._consecutive_skips >= self.max_consecutive_skips:
            raise NonFiniteLossError(
                f"{self._consecutive_skips} consecutive steps had a non-finite loss or gradient (step "
                f"{self.global_step}). Try: trainer.precision=bf16-mixed instead of 16-mixed, a lower "
                "model.optim.lr or longer model.optim.warmup_steps, model.grad_clip_norm=1.0, and check the data "
                "for bad samples."
            )

    def _skip_on_device(self, optimizer, nonfinite: torch.Tensor) -> None:
        """A non-finite step skipped without a host sync: the fused AdamW kernel leaves weights, moments and step
        count untouched when ``found_inf`` is 1 (the mechanism GradScaler uses). The counters stay on the device
        and the run-stopping check reads them only on logging steps."""
        optimizer.found_inf = nonfinite.float()
        self.skipped_steps += nonfinite
        self.consecutive_skips.add_(nonfinite).mul_(nonfinite)
        if self._host_step():
            self._consecutive_skips = int(self.consecutive_skips)
            self._check_consecutive_skips()

    def _host_step(self) -> bool:
        """Whether this step logs (Lightning's ``log_every_n_steps``): host values are read and logged only then."""
        if self._trainer is None:
            return True
        return self.trainer._logger_connector.should_update_logs

    def _log_step(self, batch: dict, loss: torch.Tensor, parts: dict, lr: float) -> None:
        n = batch["image"].shape[0] * self.trainer.world_size
        self.samples_seen += n
        if "skipped" in batch:
            skipped = self._on_device(batch["skipped"])
            if self.trainer.world_size > 1:
                # Summed over ranks, like samples_seen: the summary and the checkpoint are written by rank 0.
                skipped = self.all_gather(skipped)
            self.skipped_samples += skipped.sum()
        if "captions_at_context" in batch:
            self._count_cut_captions(batch)
        self.log("train/loss", loss, prog_bar=True)
        for name, value in parts.items():
            self.log(f"train/loss_{name}", value)
        self.log("train/logit_scale", self.model.logit_scale.detach().exp())
        if self._host_step():  # a Python float becomes a host-to-device copy in self.log
            self.log("train/lr", lr)
        self.log("train/skipped_samples", self.skipped_samples.float())
        self.log("train/skipped_steps", self.skipped_steps.float())
        if hasattr(self, "_last_grad_norm"):
            self.log("train/grad_norm", self._last_grad_norm)

    def _on_device(self, count) -> torch.Tensor:
        """A batch's counter (a Python int from our loader, or a tensor) as a 1-element tensor on the device;
        ``torch.full`` passes the int as a kernel argument, where ``torch.tensor(n, device=...)`` would copy it
        from the host and wait for the GPU."""
        if isinstance(count, torch.Tensor):
            return count.to(self.skipped_samples.device).sum().reshape(1)
        return torch.full((1,), int(count), dtype=torch.long, device=self.skipped_samples.device)

    # Captions longer than the text context are cut by the tokenizer without a word; the share is reported once,
    # from the first TRUNCATION_SAMPLE captions, so that a too-short context is noticed at the start of a run.
    TRUNCATION_SAMPLE = 256

    def _count_cut_captions(self, batch: dict) -> None:
        if getattr(self, "_cut_reported", False):
            return
        cut = batch["captions_at_context"]  # a Python int from our loader; a tensor stays on the device: no sync
        self._cut = getattr(self, "_cut", 0) + (cut.sum() if isinstance(cut, torch.Tensor) else cut)
        self._captions = getattr(self, "_captions", 0) + batch["image"].shape[0]
        if self._captions >= self.TRUNCATION_SAMPLE and self._host_step():
            self._report_cut_captions()

    def _report_cut_captions(self, log: bool = True) -> None:
        if getattr(self, "_cut_reported", False) or not getattr(self, "_captions", 0):
            return
        self._cut_reported = True
        share = float(self._cut) / self._captions
        if log:
            self.log("train/captions_cut_share", share)
        context = getattr(self.tokenizer, "context_length", None)
        if self.trainer.is_global_zero:
            advice = (
                ": see their token lengths with `medclip-prep inspect SHARDS --tokenizer DIR --context-length "
                f"{context}`, and raise model.clip.context_length if the text tower allows"
            )
            print(
                f"{share:.1%} of the first {self._captions} training captions reach the text context ({context} "
                f"tokens) and are cut{advice if share > 0.05 else ''}",
                flush=True,
            )

    def on_train_end(self) -> None:
        # A run shorter than TRUNCATION_SAMPLE captions reports what it saw (self.log is not allowed here).
        self._report_cut_captions(log=False)

    # ---- validation -------------------------------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.model(self.images(batch), batch["text"])
        loss, _ = self._loss(out, batch.get("labels"))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch["image"].shape[0])
        return loss

    # ---- optimiser --------------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        total = self.trainer.max_steps
        if total is None or total < 0:
            total = int(self.trainer.estimated_stepping_batches)
        cfg = self.optim_cfg
        if cfg.fused and str(self.trainer.precision) == "16-mixed":
            # Lightning does not unscale_ the fp16 gradients of an optimizer that unscales in its own step (fused)
            # before on_before_optimizer_step: the clipping and the non-finite check there would see scaled ones.
            raise ValueError(
                "model.optim.fused=true does not work with trainer.precision=16-mixed (the gradient clipping would see "
                "fp16-scaled gradients): leave model.optim.fused unset (foreach AdamW) or use bf16-mixed"
            )
        if cfg.fused is None:
            # torch has fused AdamW kernels for CPU and CUDA; Lightning's fp16 grad scaler is kept on the foreach path.
            fused_kernels = self.device.type in ("cpu", "cuda")
            cfg = replace(cfg, fused=fused_kernels and str(self.trainer.precision) != "16-mixed")
        optimizer, scheduler = build_optimizer(self.model, cfg, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def ema_model(model: torch.nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """torch's own EMA (``AveragedModel`` with ``get_ema_multi_avg_fn``): a copy of the model, buffers averaged too,
    updated after each optimizer step; its first update copies the weights."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    # No gradients: the optimizer and DDP's reducer must not see the copy.
    ema.requires_grad_(False)
    return ema


def _rng_state(device: torch.device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
