"""LightningCLI entry (``python train.py fit --config ...`` / ``medclip-train``): the run's configuration.

Every run writes into ``trainer.default_root_dir`` (``checkpoints/<run>/``): the resolved ``config.yaml``,
``metrics.csv``, step checkpoints and ``last.ckpt``, and ``summary.json``.
"""

from __future__ import annotations

import os
import sys
import warnings

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from medclip_train.callbacks import AtomicCheckpointIO, CheckpointOnSigterm, EvalCallback, RunCheckpoint, RunSummary
from medclip_train.data.datamodule import WebDataModule
from medclip_train.module import CLIPModule

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


class MedCLIPCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.filename": "step{step:07d}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": -1,
                "checkpoint.every_n_train_steps": 500,
            }
        )
        parser.add_lightning_class_args(EvalCallback, "eval")
        parser.add_argument("--run_name", type=str | None, default=None, help="checkpoints/<run_name>/")

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer = cfg["trainer"]
        if cfg.get("run_name"):
            trainer["default_root_dir"] = os.path.join("checkpoints", cfg["run_name"])
        root = trainer.get("default_root_dir") or os.path.join("checkpoints", "run")
        trainer["default_root_dir"] = root
        # The data config is checked first (shards exist, sizes.json for exact epochs): a missing shard must not
        # wait for the towers and their weights to be built. WebDataModule's constructor only reads file lists.
        data = cfg.get("data")
        if data is not None:
            WebDataModule(**(data.as_dict() if hasattr(data, "as_dict") else dict(data)))
        if cfg["checkpoint"].get("dirpath") is None:
            cfg["checkpoint"]["dirpath"] = root
        if cfg.get("ckpt_path"):
            _keep_previous_metrics(root)
        _wandb_offline_without_credentials(trainer.get("logger"))
        if trainer.get("logger") in (None, True):
            trainer["logger"] = [
                {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": root, "name": "", "version": ""},
                }
            ]

    def instantiate_trainer(self, **kwargs):
        # checkpoint and eval callbacks are added by LightningCLI itself (add_lightning_class_args);
        # RunSummary goes last so that it sees the final evaluation.
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # not when a config chose another writer
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        trainer.callbacks.append(CheckpointOnSigterm())
        trainer.callbacks.append(RunSummary())
        return trainer


def cli_main(args: list[str] | None = None, run: bool = True) -> MedCLIPCLI:
    """The CLI; a config error found by this package's checks ends it with ``error: <message>`` and exit code 2."""
    try:
        return MedCLIPCLI(
            CLIPModule,
            WebDataModule,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "omegaconf"} if _has_omegaconf() else {},
            args=args,
            run=run,
            auto_configure_optimizers=False,
        )
    except (ValueError, FileNotFoundError) as err:
        ours = _config_error(err)
        if ours is None:
            raise
        print(f"error: {ours}", file=sys.stderr)
        raise SystemExit(2) from None


def _wandb_offline_without_credentials(logger_cfg) -> None:
    """A configured WandbLogger logs offline when no credentials exist, instead of waiting for a login prompt."""
    if "wandb" not in str(logger_cfg).lower() or os.environ.get("WANDB_MODE"):
        return
    has_key = os.environ.get("WANDB_API_KEY") or os.path.exists(os.path.expanduser("~/.netrc"))
    if not has_key:
        os.environ["WANDB_MODE"] = "offline"
        print("wandb: no credentials found (WANDB_API_KEY or ~/.netrc); logging offline to ./wandb", file=sys.stderr)


def _keep_previous_metrics(root: str) -> None:
    """On resume, move the earlier ``metrics.csv`` aside (Lightning's CSV logger would overwrite it)."""
    path = os.path.join(root, "metrics.csv")
    if not os.path.isfile(path):
        return
    n = 1
    while os.path.exists(os.path.join(root, f"metrics.part{n}.csv")):
        n += 1
    os.replace(path, os.path.join(root, f"metrics.part{n}.csv"))


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
