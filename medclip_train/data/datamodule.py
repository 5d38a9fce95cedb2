"""``WebDataModule``: multi-source WebDataset shards streamed into Lightning, exact or resampled epochs.

Resume guarantee: the module's ``state_dict`` (saved in every Lightning checkpoint) holds the epoch, the position
in it (batches of this rank, samples of this rank and of all ranks) and the layout that position is counted in
(per-rank batch size, ranks, workers, shuffle buffer, shard list, epoch mode, seed). Exact mode: a resumed run
rebuilds the same epoch plan and each worker skips the raw samples it had already delivered (read, not decoded), so
the rest of the epoch is exactly the batches not yet trained on, sample for sample (the DataLoader may interleave its
workers' batches in another order). Elastic resume: a run resumed in the middle of an exact epoch on another number
of ranks, workers, batch size or shuffle buffer ends the epoch's part in the old layout (an ``EpochPart``), replays
its plan to find the samples it delivered, and plans what is left of the epoch over the new layout
(data/plan.py: every sample of the epoch once in all, up to the padding each part's plan adds when its ranks do not
divide what it reads). Resampled mode: the remaining batches of the virtual epoch are drawn with a new random stream
(the restart count enters the seed), so the samples already trained on are not replayed in the same order; in
another layout, the samples the virtual epoch still holds are drawn in the new one.

One direction: the model decides the tokenizer and the image preprocessing, and whoever builds both (the CLI, a
script, a test) hands them over once with :meth:`WebDataModule.connect`; the data module never calls the model. It
keeps its own position: :class:`StreamPosition`, a callback it adds to the trainer it is set up in, counts each
training batch and the end of each epoch, and ``state_dict`` / ``load_state_dict`` checkpoint it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict

import lightning as L
from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2
from torch.utils.data import DataLoader

from medclip_train.data.labels import LabelVocab
from medclip_train.data.pixels import PixelSlots, pixels_transform
from medclip_train.data.plan import EpochPart
from medclip_train.data.position import PLAN_VERSION, finished_epoch_moved_on, old_plan_message
from medclip_train.data.sources import ShardSource, check_local_shards_exist, read_label_counts, shard_sizes
from medclip_train.data.stream import ShardStream, StreamSpec
from medclip_train.distributed import world_info

log = logging.getLogger(__name__)
SHUFFLE_INITIAL = StreamSpec.shuffle_initial
PIXEL_SLOTS_HELD = 3
"""Pixel batches the main process may hold beside a worker's prefetched ones: Lightning's one-batch lookahead, the
batch in the step, and one the loop has not dropped yet. More held only costs a new block (data/pixels.py)."""


class StreamLoader(DataLoader):
    """A DataLoader that hands the epoch and the resume position to the workers each time it is iterated."""

    def __init__(self, dataset: ShardStream, state: dict, train: bool, **kwargs):
        super().__init__(dataset, batch_size=None, **kwargs)
        self._state = state
        self._train = train
        self.world: tuple[int, int] | None = None
        """(rank, world size); default: from torch.distributed. Tests set it to play one rank of many."""

    def __iter__(self):
        spec = self.dataset.spec
        if self._train:
            parts = [EpochPart(**p) for p in self._state["parts"]]
            spec.epoch = self._state["epoch"]
            spec.parts = parts
            spec.skip_batches = self._state["batches_in_epoch"] - sum(p.batches for p in parts)
            spec.restarts = self._state["restarts"]
        spec.world = self.world or world_info()
        self.dataset.remaining()  # computed here, once, and handed to every worker with the spec
        # With pinned memory the pin thread copies each batch and drops its pixels unseen by released(): no slots.
        reuse = self.num_workers > 0 and not self.pin_memory
        spec.pixel_slots = PixelSlots(self.num_workers, self.prefetch_factor + PIXEL_SLOTS_HELD) if reuse else None
        batches = super().__iter__()
        return spec.pixel_slots.released(batches) if reuse else batches

    def __len__(self) -> int:
        # The whole epoch, also after a resume: Lightning restores its own count of the batches already done in
        # the epoch and ends the epoch when that count reaches len(); the remaining length would end it early.
        # After an elastic resume that count holds the batches of the earlier parts, in their own layouts.
        world = self.world or world_info()
        if not self._train:
            return sum(self.dataset.batches_per_worker(world))
        parts = [EpochPart(**p) for p in self._state["parts"]]
        now = self.dataset.batches_per_worker(world, self._state["epoch"], parts)
        return sum(p.batches for p in parts) + sum(now)


class StreamPosition(L.Callback):
    """The data module's position in the stream, moved by the trainer's loop (added by ``WebDataModule.setup``).

    A batch counts as consumed when its step starts (a checkpoint after the step then holds it as trained on);
    Lightning's epoch end moves the position to the next epoch when the whole epoch was consumed.
    """

    def __init__(self, data: WebDataModule):
        self.data = data

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.data.on_train_batch_consumed(batch["image"].shape[0])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.data.on_train_epoch_done()


class WebDataModule(L.LightningDataModule):
    def __init__(
        self,
        train: list[ShardSource] | str | None = None,
        val: str | None = None,
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 2,
        epoch_mode: str = "exact",
        samples_per_epoch: int | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        label_top_k: int = 0,
        random_caption: bool = True,
        train_scale: tuple[float, float] = (0.9, 1.0),
        color_jitter: float | None = None,
        max_skip_fraction: float = 0.05,
        pin_memory: bool = True,
        prefetch_factor: int = 4,
        worker_priority: str = "auto",
    ):
        """The shards and how they are streamed (--data.*).

        Args:
            train: Training sources, each a shard pattern with a mixing weight (a plain pattern string is one
                source of weight 1).
            val: Shard pattern of the held-out set (validation loss).
            batch_size: Per-rank batch size (with exact accumulation, the whole accumulated batch).
            val_batch_size: Per-rank batch size of validation; default: ``batch_size``.
            num_workers: Data loader processes per rank (decoding and augmentation).
            epoch_mode: ``exact`` (each sample once per epoch, counts from ``sizes.json``) or ``resampled``
                (weighted shard sampling with replacement, virtual epochs of ``samples_per_epoch``).
            samples_per_epoch: Samples of a virtual epoch, over all ranks; required by ``epoch_mode: resampled``.
            shuffle_buffer: Samples held in each worker's shuffle buffer (0: none; the shard order is shuffled
                either way).
            seed: Seed of the shard order, the shuffle buffer and the caption draws.
            label_top_k: Size of the label/CUI vocabulary for the semantic matching loss (0: no labels).
            random_caption: Draw one of a sample's captions at random each epoch (its ``.json`` ``captions``);
                false: always its ``.txt``.
            train_scale: RandomResizedCrop scale range (BiomedCLIP/open_clip use (0.9, 1.0)).
            color_jitter: Colour jitter strength of training images (open_clip's ``color_jitter``); default: none.
            max_skip_fraction: Stop with an error naming the shard when more samples than this share are bad.
            pin_memory: Pinned host memory for batches (used on CUDA only).
            prefetch_factor: Batches each worker prepares ahead.
            worker_priority: ``idle``: loader workers run under Linux's ``SCHED_IDLE``, so they take only core time
                the training threads leave idle instead of preempting them (on the 2-core CPU benchmark +6%
                samples/s: a preempted thread stalls its whole parallel op); ``normal``: the OS default; ``auto``
                (default): ``idle`` when training on CPU, where workers and training share the cores, else
                ``normal`` (on a GPU machine the workers are what keeps the GPU fed).
        """
        super().__init__()
        if epoch_mode not in ("exact", "resampled"):
            raise ValueError(f"data.epoch_mode must be 'exact' or 'resampled', got {epoch_mode!r}")
        if epoch_mode == "resampled" and not samples_per_epoch:
            raise ValueError("data.samples_per_epoch is required with data.epoch_mode=resampled")
        if batch_size <= 0:
            raise ValueError(f"data.batch_size must be positive, got {batch_size}")
        if isinstance(train, str):
            train = [ShardSource(train)]
        self.sources = [s if isinstance(s, ShardSource) else ShardSource(**s) for s in (train or [])]
        self.val = val
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.epoch_mode = epoch_mode
        self.samples_per_epoch = samples_per_epoch
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.label_top_k = label_top_k
        self.random_caption = random_caption
        self.aug_cfg = AugmentationCfg(scale=tuple(train_scale), color_jitter=color_jitter)
        self.max_skip_fraction = max_skip_fraction
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        if worker_priority not in ("auto", "idle", "normal"):
            raise ValueError(f"data.worker_priority must be 'auto', 'idle' or 'normal', got {worker_priority!r}")
        self.worker_priority = worker_priority
        self.tokenizer = None
        self.preprocess_cfg: dict | None = None
        self.vocab: LabelVocab | None = None
        self._train_loader: StreamLoader | None = None
        self.world: tuple[int, int] | None = None
        """(rank, world size); default: from torch.distributed. Tests set it to play one rank of many."""
        self.stream_state = _epoch_start({"epoch": 0, "restarts": 0})
        self._train_urls, self._train_sizes, self._source_of_shard = self._resolve_train()

    # ---- set-up --------------------------------------------------------------------------------------------------
    def _resolve_train(self):
        urls, source_of_shard, sizes = [], [], []
        for i, source in enumerate(self.sources):
            source_urls = source.urls()
            check_local_shards_exist(source_urls, f"data.train[{i}].shards")
            urls += source_urls
            source_of_shard += [i] * len(source_urls)
            if sizes is not None:
                try:  # local, fsspec URL (next to the shards) or the source's own `sizes` file
                    sizes += shard_sizes(source_urls, f"data.train[{i}]", source.sizes)
                except FileNotFoundError:
                    if self.epoch_mode == "exact":
                        raise
                    sizes = None  # resampled: shards are then drawn with equal weight inside a source
        if not urls:
            sizes = None
        if self.val:
            from webdataset.shardlists import expand_urls

            check_local_shards_exist(expand_urls(self.val), "data.val")
        return urls, sizes, source_of_shard

    def connect(self, tokenizer, preprocess_cfg: dict, vocab: LabelVocab | None = None) -> None:
        """Hand the data side what the model decides, once, before the loaders are built: tokenizer, image size and
        mean/std (the model's ``tokenizer`` and ``preprocess_cfg``); a label vocabulary, or with ``label_top_k`` the
        one built from the manifests' label counts."""
        self.tokenizer = tokenizer
        self.preprocess_cfg = dict(preprocess_cfg)
        if vocab is not None:
            self.vocab = vocab
        elif self.label_top_k and self.vocab is None:
            counts = read_label_counts(self._train_urls)
            if not counts:
                raise ValueError(
                    "data.label_top_k > 0 but no manifest.json with label_counts next to the training shards"
                )
            self.vocab = LabelVocab.from_counts(counts, self.label_top_k)

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            raise RuntimeError(
                "WebDataModule.connect(model.tokenizer, model.preprocess_cfg) must be called before fitting (the CLI "
                "does it): the data side needs the model's tokenizer and image preprocessing"
            )
        trainer = self.trainer
        if trainer is not None and not any(isinstance(c, StreamPosition) and c.data is self for c in trainer.callbacks):
            trainer.callbacks.append(StreamPosition(self))

    # ---- loaders -------------------------------------------------------------------------------------------------
    def _spec(self, urls, sizes, train: bool, batch_size: int) -> StreamSpec:
        cfg = PreprocessCfg(**{k: v for k, v in self.preprocess_cfg.items() if k in PreprocessCfg.__annotations__})
        # uint8 pixels leave the workers; the model side normalises them. The transform stops at the PIL image, which
        # the stream's stack_pixels copies into the batch (see data/pixels.py).
        transform = pixels_transform(
            image_transform_v2(cfg, is_train=train, aug_cfg=self.aug_cfg if train else None), tensor=False
        )
        size = cfg.size if isinstance(cfg.size, int) else max(cfg.size)
        return StreamSpec(
            urls=urls,
            sizes=sizes,
            source_of_shard=self._source_of_shard if train else [0] * len(urls),
            source_weights=[s.weight for s in self.sources] if train else [1.0],
            batch_size=batch_size,
            transform=transform,
            tokenizer=self.tokenizer,
            image_size=size,
            mode=self.epoch_mode if train else "exact",
            samples_per_epoch=self.samples_per_epoch,
            shuffle=train,
            shuffle_buffer=self.shuffle_buffer if train else 0,
            seed=self.seed,
            vocab=self.vocab,
            random_caption=self.random_caption and train,
            max_skip_fraction=self.max_skip_fraction,
            num_workers=self.num_workers,
            pad_token_id=getattr(getattr(self.tokenizer, "tokenizer", None), "pad_token_id", 0) or 0,
        )

    def _loader(self, spec: StreamSpec, train: bool) -> StreamLoader:
        kwargs = {"num_workers": self.num_workers, "pin_memory": self.pin_memory and _cuda()}
        if self.num_workers > 0:
            kwargs["prefetch_factor"] = self.prefetch_factor
            if self._idle_workers():
                kwargs["worker_init_fn"] = _idle_worker
        return StreamLoader(ShardStream(spec), self.stream_state, train, **kwargs)

    def train_dataloader(self) -> StreamLoader:
        if not self._train_urls:
            raise ValueError("data.train: no training shards configured")
        self._train_loader = self._loader(self._spec(self._train_urls, self._train_sizes, True, self.batch_size), True)
        self._train_loader.world = self.world
        return self._train_loader

    def val_dataloader(self):
        if not self.val:
            return []
        from webdataset.shardlists import expand_urls

        urls = expand_urls(self.val)
        spec = self._spec(urls, shard_sizes(urls, "data.val"), False, self.val_batch_size)
        return self._loader(spec, False)

    def _idle_workers(self) -> bool:
        if self.worker_priority != "auto":
            return self.worker_priority == "idle"
        trainer = self.trainer
        return trainer.strategy.root_device.type == "cpu" if trainer is not None else not _cuda()

    # ---- stream position (moved by StreamPosition) ---------------------------------------------------------------
    def on_train_batch_consumed(self, n_samples: int) -> None:
        self.stream_state["batches_in_epoch"] += 1
        self.stream_state["samples_in_epoch"] += n_samples
        # Every rank runs batches of the same shape (see data/plan.py), so all ranks together took n x ranks.
        self.stream_state["samples_in_epoch_all_ranks"] += n_samples * self._world()[1]

    def on_train_epoch_done(self) -> None:
        batches = self.stream_state["batches_in_epoch"]
        planned = len(self._train_loader) if self._train_loader is not None else None
        if batches == 0:
            # Nothing of this epoch was trained on: Lightning ends an epoch without fetching a batch when it resumes
            # from a checkpoint taken at an epoch's last step; that epoch was already counted. (An epoch of bad
            # samples cannot get here: the stream raises DataError when a worker yields no good sample.)
            return
        if planned is not None and batches < planned:
            # Lightning ends the epoch when the run stops (max_steps, SIGTERM) in its middle: the position stays,
            # so that a resume continues this epoch instead of skipping the rest of it.
            return
        self._move_to(_epoch_start({**self.stream_state, "epoch": self.stream_state["epoch"] + 1}))

    def _move_to(self, position: dict) -> None:
        # In place: the train loader holds this very dict and reads the position from it each epoch.
        self.stream_state.clear()
        self.stream_state.update(position)

    def _world(self) -> tuple[int, int]:
        return self.world or world_info()

    def layout(self) -> dict:
        """What the stream position is counted in; a resume is checked against it (medclip_train/resume.py)."""
        return {
            "train": [{"shards": s.shards, "weight": float(s.weight)} for s in self.sources],
            "epoch_mode": self.epoch_mode,
            "seed": self.seed,
            "samples_per_epoch": self.samples_per_epoch,
            **self._part_layout(),
        }

    def _part_layout(self) -> dict:
        """The settings an epoch's plan is cut by; a resume with others in the middle of an epoch starts a new part."""
        return {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "world_size": self._world()[1],
            "shuffle_buffer": self.shuffle_buffer,
            "shuffle_initial": SHUFFLE_INITIAL,
        }

    def state_dict(self) -> dict:
        state = {**self.stream_state, "parts": [dict(p) for p in self.stream_state["parts"]]}
        state["layout"] = self.layout()
        state["plan"] = PLAN_VERSION
        # A checkpoint taken at an epoch's last step (before Lightning's epoch end) holds the whole epoch as consumed:
        # with the plan's length a resume sees the epoch as finished, not as a position inside it.
        state["batches_planned"] = len(self._train_loader) if self._train_loader is not None else None
        if self.vocab is not None:
            state["vocab"] = list(self.vocab.labels)
        return state

    def load_state_dict(self, state: dict) -> None:
        state = finished_epoch_moved_on(state)
        position = _epoch_start({"epoch": state.get("epoch", 0), "restarts": state.get("restarts", 0) + 1})
        if state.get("batches_in_epoch", 0) > 0:
            if state.get("plan") != PLAN_VERSION:
                raise ValueError(old_plan_message(state))
            keys = ("batches_in_epoch", "samples_in_epoch", "samples_in_epoch_all_ranks", "parts")
            position.update({k: state[k] for k in keys if k in state})
            position["parts"] = self._parts_after_resume(state)
        self._move_to(position)
        if "vocab" in state:
            saved = LabelVocab(tuple(state["vocab"]))
            if self.vocab is not None and self.vocab != saved:
                raise ValueError(
                    f"data.label_top_k: the label vocabulary built from the manifests ({len(self.vocab)} labels) "
                    f"does not match the checkpoint's ({len(saved)} labels); resume with the same data and top-K"
                )
            self.vocab = saved

    def _parts_after_resume(self, state: dict) -> list[dict]:
        """The epoch's parts: the checkpoint's, and one more ending at its position when this run's layout differs."""
        parts = [dict(p) for p in state.get("parts", [])]
        saved = state.get("layout") or {}
        then = {k: saved[k] for k in self._part_layout()}
        now = self._part_layout()
        if then == now:
            return parts
        done = state["batches_in_epoch"] - sum(p["batches"] for p in parts)
        parts.append(asdict(EpochPart(**then, batches=done)))
        changed = ", ".join(f"{k} {then[k]} -> {now[k]}" for k in now if then[k] != now[k])
        log.warning(
            "data: epoch %d continues in another layout (%s) after %d batches per rank; the samples not yet trained "
            "on are re-planned over this run's ranks and workers",
            state.get("epoch", 0),
            changed,
            done,
        )
        return parts


def _epoch_start(state: dict) -> dict:
    """``state`` at the start of its epoch: nothing of it trained on yet."""
    return {**state, "batches_in_epoch": 0, "samples_in_epoch": 0, "samples_in_epoch_all_ranks": 0, "parts": []}


def _idle_worker(_worker_id: int) -> None:
    """A loader worker's init under ``data.worker_priority`` idle: the lowest scheduling class, which only gets a core
    nothing else wants (Linux). Where it is not available the worker keeps the default priority."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        log.debug("SCHED_IDLE is not available here; loader workers keep the default priority")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


__all__ = ["ShardSource", "StreamLoader", "StreamPosition", "WebDataModule"]
