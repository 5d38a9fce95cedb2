"""LightningCLI entry (``python train.py fit --config ...`` / ``medclip-train``): the run's configuration.

Every run writes into ``trainer.default_root_dir`` (``checkpoints/run/``; with ``--run_name NAME``,
``<default_root_dir or checkpoints>/NAME/``): the resolved ``config.yaml``, ``metrics.csv``, step checkpoints and
``last.ckpt``, and ``summary.json``. Progress goes to stdout, counted in optimizer steps (``StepProgress``).
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import warnings

from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from medclip_train.callbacks import (
    AtomicCheckpointIO,
    EvalCallback,
    Preemption,
    RunCheckpoint,
    RunSummary,
    StepProgress,
)
from medclip_train.data.datamodule import WebDataModule
from medclip_train.distributed import launcher_num_nodes
from medclip_train.module import CLIPModule
from medclip_train.remote import resolve_last as resolve_remote_last
from medclip_train.resume import check_resume, read_resume_state, resolve_checkpoint
from medclip_train.run_dir import (
    RunFolderBusy,
    RunLock,
    is_launcher_rank_zero,
    keep_previous_metrics,
    release_held_locks,
    remove_stale_checkpoint_temporaries,
)

# Lightning warnings that do not apply here, silenced so that the ones that do stay visible:
# our IterableDataset's __len__ is exact per worker (see data/plan.py); checkpoints after the optimiser step are
# what we want with manual optimisation; the pytree deprecation is internal to Lightning.
for _message in (
    r".*`IterableDataset` has `__len__` defined.*",
    r".*Using ModelCheckpoint with manual optimization.*",
    r".*isinstance\(treespec, LeafSpec\).*",
    r".*litlogger.*",
    r".*Previous log files in this directory will be deleted.*",  # metrics.csv is moved aside on resume
    r".*Total length of `list` across ranks is zero.*",  # no validation set configured
    r".*Checkpoint directory .* exists and is not empty.*",  # config.yaml lands in the run folder first
):
    warnings.filterwarnings("ignore", message=_message)

# `train.py fit --help` documents every option of this package from its docstrings: the Args of the __init__s, and
# the attribute docstrings of the config dataclasses (`--model.clip.preset` ...), which jsonargparse reads only
# when asked to.
set_parsing_settings(docstring_parse_attribute_docstrings=True)

# Lightning logs every 50 steps when trainer.log_every_n_steps is not set: a shorter run wrote no metrics.csv.
LIGHTNING_LOG_EVERY_N_STEPS = 50


class MedCLIPArgumentParser(LightningArgumentParser):
    """Lightning's parser with one-line errors: the option, the value and what was expected, or the nearest real
    option for a typo, instead of the usage text and jsonargparse's nested union report."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # `--trainer.max_step 30` must not silently mean max_steps
        super().__init__(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error:
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        print(f"error: {short_parse_error(message, parser)}", file=sys.stderr)
        raise SystemExit(2)


def short_parse_error(message: str, parser) -> str:
    """One line for a jsonargparse error message (see MedCLIPArgumentParser)."""
    unknown = re.search(r"[Uu]nrecognized arguments: (\S+)", message)
    if unknown:
        option = unknown.group(1).split("=", 1)[0]
        known = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
        close = difflib.get_close_matches(option, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        return f"unknown option {option}{hint} ({parser.prog} --help lists the options)"
    keys = re.findall(r'(?:Parser key|Key) "([^"]+)"', message)
    expected = re.search(r"Expected a <class '([^']+)'>\. Got value: (.*)", message)
    if keys and expected:
        path = []
        for key in keys:  # nested reports name the key relative to its parent
            path = key.split(".") if key.startswith(".".join(path)) and path else [*path, *key.split(".")]
        return f"--{'.'.join(path)}: expected {expected.group(1)}, got {expected.group(2).strip()!r}"
    for line in message.splitlines():
        if line.strip():
            return line.strip()
    return message


class MedCLIPCLI(LightningCLI):
    def add_core_arguments_to_parser(self, parser) -> None:
        # Lightning's, with `data` before `model`: jsonargparse instantiates the groups in the order they were added,
        # so WebDataModule's constructor checks the shards (they exist, sizes.json for exact epochs) before the towers
        # and their weights are built, and a missing shard is reported at once (test_refused_combinations.py).
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=self.subclass_mode_data)
        parser.add_lightning_class_args(self._model_class, "model", subclass_mode=self.subclass_mode_model)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.filename": "step{step:07d}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": -1,
                "checkpoint.every_n_train_steps": 500,
                # A run folder belongs to one run (it is locked): a resumed run replaces last.ckpt instead of
                # writing last-v1.ckpt next to a stale last.ckpt that evaluation and export would then read.
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.add_lightning_class_args(EvalCallback, "eval")
        parser.add_argument(
            "--run_name",
            type=str | None,
            default=None,
            help="name of the run folder: <trainer.default_root_dir or checkpoints>/<run_name>/",
        )
        parser.add_argument(
            "--resume_allow_changed",
            type=list[str],
            default=[],
            help="with --ckpt_path: config fields allowed to differ from the checkpoint's (e.g. "
            "'[model.clip.tokenizer]'); any other change of the model or the data plan is refused",
        )

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer = cfg["trainer"]
        if cfg.get("run_name"):
            trainer["default_root_dir"] = os.path.join(
                trainer.get("default_root_dir") or "checkpoints", cfg["run_name"]
            )
        root = trainer.get("default_root_dir") or os.path.join("checkpoints", "run")
        trainer["default_root_dir"] = root
        if trainer.get("max_steps") is not None and trainer["max_steps"] == 0:
            raise ValueError("trainer.max_steps: 0 trains nothing; give a positive number of steps (-1: no limit)")
        refuse_untested_strategy(trainer.get("strategy"))
        trainer["log_every_n_steps"] = log_interval(trainer.get("log_every_n_steps"), trainer.get("max_steps"))
        trainer["num_nodes"] = launcher_num_nodes(trainer.get("num_nodes"))  # the world torchrun/SLURM started
        check_labels_for_loss(cfg.get("model"), cfg.get("data"))
        if cfg["checkpoint"].get("dirpath") is None:
            cfg["checkpoint"]["dirpath"] = root
        if self.subcommand in (None, "fit"):
            self._prepare_run_folder(cfg, root)
        _wandb_offline_without_credentials(trainer.get("logger"))
        if trainer.get("logger") in (None, True):
            trainer["logger"] = [
                {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": root, "name": "", "version": ""},
                }
            ]

    def _prepare_run_folder(self, cfg, root: str) -> None:
        """Resume checks, then (on the launcher's rank zero only) the folder's lock and its tidying."""
        rank_zero, locked = is_launcher_rank_zero(), False
        remote_dir = cfg["checkpoint"].get("remote_dir")
        if cfg.get("ckpt_path") == "last" and remote_dir:
            # A newer remote checkpoint is downloaded into the run folder: by rank zero only once the folder is ours.
            if rank_zero:
                RunLock(root).acquire()
                locked = True
            cfg["ckpt_path"] = resolve_remote_last(remote_dir, cfg["checkpoint"]["dirpath"], rank_zero)
        ckpt = resolve_checkpoint(cfg.get("ckpt_path"), cfg["checkpoint"]["dirpath"])
        if ckpt is not None:
            state = read_resume_state(ckpt)
            max_steps = cfg["trainer"].get("max_steps")
            if max_steps is not None and max_steps > 0 and state["global_step"] >= max_steps:
                print(
                    f"this run already finished at step {state['global_step']} ({ckpt}; trainer.max_steps="
                    f"{max_steps}): nothing to do. Raise trainer.max_steps to train further."
                )
                raise RunAlreadyFinished()
            model = cfg.get("model")
            clip = model.get("clip") if model is not None else None
            for change in check_resume(state, clip, cfg.get("data"), cfg.get("resume_allow_changed")):
                print(f"warning: resuming with a changed setting (--resume_allow_changed): {change}", file=sys.stderr)
        if not rank_zero:
            return
        if not locked:
            RunLock(root).acquire()
        for name in remove_stale_checkpoint_temporaries(cfg["checkpoint"]["dirpath"]):
            print(f"removed {name}: a checkpoint write interrupted by an earlier run's crash", file=sys.stderr)
        if cfg.get("ckpt_path"):
            keep_previous_metrics(root)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # The one link between model and data, in one direction: the data side gets the model's tokenizer and
        # image preprocessing (WebDataModule.connect); the module never calls the data module.
        self.datamodule.connect(self.model.tokenizer, self.model.preprocess_cfg)

    def instantiate_trainer(self, **kwargs):
        # checkpoint and eval callbacks are added by LightningCLI itself (add_lightning_class_args);
        # RunSummary goes last so that it sees the final evaluation.
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not when a config chose another writer
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        bar = trainer.progress_bar_callback
        configured = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        if bar is not None and not any(cb is bar for cb in configured):
            # Lightning's default bar counts batches per epoch ("Epoch 2/-2" with max_steps) and prints nothing
            # useful to a log file; a bar the user configured is kept.
            trainer.callbacks[trainer.callbacks.index(bar)] = StepProgress()
        trainer.callbacks.append(Preemption())
        trainer.callbacks.append(RunSummary())
        return trainer


def refuse_untested_strategy(strategy) -> None:
    """Lightning's FSDP1 strategies (``fsdp``, ``fsdp_cpu_offload``, ``FSDPStrategy``) are refused: the training
    loop's GradCache re-forward, ``clip_grad_norm_`` (a norm over this rank's shards only under FSDP1) and the
    non-finite skip (which ranks must agree on) have not been checked under them; Lightning runs FSDP1 on GPUs only,
    so the CPU suite cannot. FSDP2 (``ModelParallelStrategy``, ``CLIPModule.configure_model``) runs on CPU and is
    tested (tests/training/test_fsdp.py)."""
    if strategy is None or isinstance(strategy, str):
        name = strategy
    elif hasattr(strategy, "get"):  # a class_path config (jsonargparse Namespace or dict)
        name = strategy.get("class_path")
    else:
        name = type(strategy).__name__
    if name and str(name).split(".")[-1] == "ModelParallelStrategy" and _distributed_checkpoints(strategy):
        raise ValueError(
            "trainer.strategy.save_distributed_checkpoint: ModelParallelStrategy writes a folder of shards per "
            "checkpoint by default, which resume and medclip-export do not read; pass "
            "--trainer.strategy.save_distributed_checkpoint false (one file, as DDP's)"
        )
    if name and "fsdp" in str(name).lower():
        raise ValueError(
            f"trainer.strategy: {name} (FSDP1) is not supported with this training loop (Lightning runs it on GPUs "
            "only, so GradCache, clipping over shards and the non-finite skip are unchecked there until a GPU check); "
            "use FSDP2: --trainer.strategy ModelParallelStrategy --trainer.strategy.data_parallel_size <processes> "
            "--trainer.strategy.tensor_parallel_size 1 --trainer.strategy.save_distributed_checkpoint false, "
            "or --trainer.strategy ddp"
        )


def _distributed_checkpoints(strategy) -> bool:
    """Whether a ModelParallelStrategy config leaves ``save_distributed_checkpoint`` at Lightning's default (true)."""
    init_args = strategy.get("init_args") if hasattr(strategy, "get") else None
    if init_args is None:
        return getattr(strategy, "_save_distributed_checkpoint", True)
    value = init_args.get("save_distributed_checkpoint") if hasattr(init_args, "get") else None
    return value is None or bool(value)


def check_labels_for_loss(model, data) -> None:
    """Semantic matching (``model.loss.w_sm > 0``) needs the batch's label vectors, which the data module makes only
    with ``data.label_top_k > 0``: refused before anything is built."""
    loss = _field(model, "loss")
    if loss is None or data is None:
        return
    if _field(loss, "kind") == "clip" and (_field(loss, "w_sm") or 0) > 0 and not _field(data, "label_top_k"):
        raise ValueError("model.loss.w_sm > 0 needs label vectors: set data.label_top_k > 0")


def _field(config, name: str):
    """A field of a parsed config section (a jsonargparse Namespace or a dataclass), or None."""
    if config is None:
        return None
    return config.get(name) if hasattr(config, "get") else getattr(config, name, None)


def log_interval(configured: int | None, max_steps: int | None) -> int | None:
    """``trainer.log_every_n_steps``: the user's value, or for a run of ``max_steps`` about 10 rows of metrics
    (at most Lightning's default interval), so that a short run's ``metrics.csv`` is never empty."""
    if configured is not None or max_steps is None or max_steps <= 0:
        return configured
    return min(LIGHTNING_LOG_EVERY_N_STEPS, max(1, max_steps // 10))


class RunAlreadyFinished(Exception):
    """``--ckpt_path`` names a checkpoint at or past ``trainer.max_steps``: nothing to train, nothing touched."""


def cli_main(args: list[str] | None = None, run: bool = True) -> MedCLIPCLI:
    """The CLI; a config error found by this package's checks ends it with ``error: <message>`` and exit code 2.

    A run stopped by SIGTERM/SIGUSR1 (after saving ``last.ckpt``) exits with 128 + the signal number.
    """
    try:
        cli = MedCLIPCLI(
            CLIPModule,
            WebDataModule,
            save_config_kwargs={"overwrite": True},
            parser_class=MedCLIPArgumentParser,
            parser_kwargs={"parser_mode": "omegaconf"} if _has_omegaconf() else {},
            args=args,
            run=run,
            auto_configure_optimizers=False,
        )
    except RunAlreadyFinished:
        raise SystemExit(0) from None
    except RunFolderBusy as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except (ValueError, FileNotFoundError) as err:
        ours = _config_error(err)
        if ours is None:
            raise
        print(f"error: {ours}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        release_held_locks()
    callbacks = getattr(getattr(cli, "trainer", None), "callbacks", [])
    preemption = next((cb for cb in callbacks if isinstance(cb, Preemption)), None) if run else None
    if preemption is not None and preemption.stopped_by:
        preemption.requeue(cli.trainer.is_global_zero)
        print(f"stopped by {preemption.stopped_by}; last.ckpt holds step {cli.trainer.global_step}", file=sys.stderr)
        raise SystemExit(preemption.exit_code())
    return cli


def _wandb_offline_without_credentials(logger_cfg) -> None:
    """A configured WandbLogger logs offline when no credentials exist, instead of waiting for a login prompt."""
    if "wandb" not in str(logger_cfg).lower() or os.environ.get("WANDB_MODE"):
        return
    has_key = os.environ.get("WANDB_API_KEY") or os.path.exists(os.path.expanduser("~/.netrc"))
    if not has_key:
        os.environ["WANDB_MODE"] = "offline"
        print("wandb: no credentials found (WANDB_API_KEY or ~/.netrc); logging offline to ./wandb", file=sys.stderr)


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _config_error(err: BaseException | None) -> BaseException | None:
    """The error that one of this package's config checks raised, if ``err`` is or wraps one.

    The checks name the field in their message, so the message is all the user needs; jsonargparse wraps them
    in a union-type error with the whole namespace. Anything raised elsewhere keeps its traceback.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        tb = err.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        raised_here = tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR)
        if isinstance(err, (ValueError, FileNotFoundError)) and raised_here:
            return err
        err = err.__cause__ or err.__context__
    return None


def _has_omegaconf() -> bool:
    try:
        import omegaconf  # noqa: F401

        return True
    except ImportError:
        return False


def train_main() -> None:
    """Console script ``medclip-train``: the same CLI as ``python train.py``."""
    cli_main(sys.argv[1:])
