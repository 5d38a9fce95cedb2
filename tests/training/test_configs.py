"""Every shipped training config parses through the CLI, and its typed sections validate (nothing is built)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm

from medclip_train.cli import MedCLIPCLI
from medclip_train.config import LossConfig, ModelConfig, OptimConfig
from medclip_train.data.datamodule import WebDataModule
from medclip_train.data.sources import ShardSource
from medclip_train.model.factory import resolve_open_clip_cfg
from medclip_train.module import CLIPModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# Every YAML here is a run config (prompt sets and catalogs live in medclip_train/evaluation/).
SHIPPED = sorted(p for p in CONFIGS.rglob("*.yaml") if not {"prompts", "eval"} & set(p.relative_to(CONFIGS).parts))
PRECISIONS = {"32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true"}
COMPOSED = ["base.yaml", "model/biomedclip.yaml", "data/roco_medicat_pmcoa.yaml", "trainer/ddp_bf16.yaml"]


class ParseOnlyCLI(MedCLIPCLI):
    """The project's parser (same arguments and defaults), without building the model, the data or the trainer."""

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def parse(*configs: Path):
    args = [a for path in configs for a in ("--config", str(path))]
    return ParseOnlyCLI(CLIPModule, WebDataModule, args=args, run=False, auto_configure_optimizers=False).config


def as_dict(value) -> dict:
    return value.as_dict() if hasattr(value, "as_dict") else dict(value or {})


def validate_sections(cfg) -> ModelConfig:
    """Build the dataclasses of the model, loss, optimiser and data sources from the parsed values."""
    model = as_dict(cfg.model)
    clip = ModelConfig(**as_dict(model.get("clip")))
    LossConfig(**as_dict(model.get("loss")))
    OptimConfig(**as_dict(model.get("optim")))
    train = cfg.data.train
    for source in [train] if isinstance(train, str) else train or []:
        ShardSource(**as_dict(source)) if not isinstance(source, str) else ShardSource(source)
    model_cfg, _ = resolve_open_clip_cfg(clip)
    assert timm.is_model(model_cfg["vision_cfg"]["timm_model_name"])
    return clip


def check_trainer(cfg) -> None:
    trainer = as_dict(cfg.trainer)
    precision = trainer.get("precision")
    assert precision is None or str(precision) in PRECISIONS, precision
    # Accumulation is exact and the module's (model.accumulation_steps); Lightning refuses its own with manual
    # optimisation.
    assert trainer.get("accumulate_grad_batches") in (None, 1)


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(CONFIGS)) for p in SHIPPED])
def test_shipped_config_parses_and_validates(path):
    cfg = parse(path)
    validate_sections(cfg)
    check_trainer(cfg)


def test_shipped_configs_are_found():
    names = {str(p.relative_to(CONFIGS)) for p in SHIPPED}
    assert {"base.yaml", "demo_cpu.yaml", "test_tiny.yaml", "pretrain_biomedclip.yaml", *COMPOSED} <= names


def test_composed_biomedclip_pretraining_parses_and_matches_the_single_file():
    composed = parse(*(CONFIGS / name for name in COMPOSED))
    clip = validate_sections(composed)
    check_trainer(composed)
    assert clip.preset == "biomedclip_vit_b16_pubmedbert256" and clip.pretrained_text
    assert composed.trainer.strategy == "ddp" and composed.trainer.precision == "bf16-mixed"
    assert [s.name for s in composed.data.train] == ["roco", "medicat", "pmc_oa"]
    # pretrain_biomedclip.yaml says it is this composition in one file: the run-defining values must agree.
    single = parse(CONFIGS / "pretrain_biomedclip.yaml")
    for key, cls in (("model.clip", ModelConfig), ("model.loss", LossConfig), ("model.optim", OptimConfig)):
        assert cls(**as_dict(composed[key])) == cls(**as_dict(single[key])), key  # None means the defaults
    for key in (
        "model.accumulation_steps",
        "model.grad_clip_norm",
        "data.train",
        "data.val",
        "data.epoch_mode",
        "data.samples_per_epoch",
        "data.batch_size",
        "trainer.precision",
        "trainer.strategy",
        "trainer.max_steps",
        "trainer.val_check_interval",
        "checkpoint.every_n_train_steps",
        "seed_everything",
    ):
        assert composed[key] == single[key], key


def test_unknown_key_in_a_config_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  optim:\n    learning_rate: 1.0e-3\n")
    with pytest.raises(SystemExit):
        parse(bad)
    assert "learning_rate" in capsys.readouterr().err
