"""Settings that are each valid but wrong together are refused before the first step, with one line naming both."""

from __future__ import annotations

import json

import pytest

from tests.training.conftest import fit_args, run_cli

# fp16 AMP with its GradScaler, on the CPU: Lightning turns `--trainer.precision 16-mixed` into bf16-mixed there
# (no scaler), but takes the precision plugin as given, and the Trainer then reports "16-mixed" as on a GPU.
FP16_SCALER_ON_CPU = [
    "--trainer.precision",
    "null",  # Lightning refuses a precision flag next to a precision plugin
    "--trainer.plugins+",
    json.dumps(
        {
            "class_path": "lightning.pytorch.plugins.MixedPrecision",
            "init_args": {"precision": "16-mixed", "device": "cpu"},
        }
    ),
]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: "), err[-2000:]
    return line


def test_fused_adamw_with_fp16_grad_scaler_is_refused_before_training(tmp_path, shards, tok, capsys):
    # Lightning does not unscale_ the gradients of an optimizer that unscales in its own step (fused AdamW) before
    # on_before_optimizer_step: the clipping and the non-finite check there would see gradients x 65536.
    root = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(fit_args(tok, shards([8]), root, "--model.optim.fused", "true", *FP16_SCALER_ON_CPU))
    assert exit_info.value.code == 2
    line = one_line_error(capsys)
    assert "model.optim.fused" in line and "trainer.precision" in line and "16-mixed" in line
    assert not (root / "last.ckpt").exists(), "no step was trained"


def test_fp16_grad_scaler_with_default_adamw_kernel_trains(tmp_path, shards, tok):
    # The refusal is for an explicit `fused: true` only: by default 16-mixed gets foreach AdamW, which Lightning
    # unscales before the clipping.
    cli = run_cli(fit_args(tok, shards([8]), tmp_path / "run", "--trainer.max_steps", "1", *FP16_SCALER_ON_CPU))
    assert cli.trainer.precision == "16-mixed" and cli.trainer.precision_plugin.scaler is not None
    assert not cli.trainer.optimizers[0].defaults["fused"]
    assert cli.trainer.global_step == 1


REFUSED = {
    # InfoNCE never uses the bias (a constant shift of a softmax row): the trainable parameter gets no gradient, so
    # DDP fails its second step ("Expected to have finished reduction") and accumulation's autograd.grad fails.
    "logit_bias_with_infonce": (
        ["--model.clip.init_logit_bias", "-10"],
        ["model.clip.init_logit_bias", "model.loss.kind"],
    ),
    # The loss needs the batch's label vectors, which the data module makes only with data.label_top_k > 0.
    "semantic_matching_without_labels": (["--model.loss.w_sm", "1.0"], ["model.loss.w_sm", "data.label_top_k"]),
}


@pytest.mark.parametrize(("args", "named"), REFUSED.values(), ids=REFUSED.keys())
def test_a_combination_is_refused_at_config_time_naming_both(tmp_path, shards, tok, capsys, args, named):
    root = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(fit_args(tok, shards([8]), root, *args))
    assert exit_info.value.code == 2
    line = one_line_error(capsys)
    assert all(name in line for name in named), line
    assert not (root / "last.ckpt").exists()


def test_a_missing_shard_is_reported_before_the_model_is_built(tmp_path, capsys):
    # The tokenizer folder does not exist either: building the model would fail on it first. The data module is
    # instantiated before the model, so the user hears of the shard (data.train) without waiting for the towers.
    missing = str(tmp_path / "shards" / "train-{000000..000001}.tar")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(fit_args(tmp_path / "no-tokenizer", missing, tmp_path / "run"))
    assert exit_info.value.code == 2
    line = one_line_error(capsys)
    assert line.startswith("error: data.train[0].shards: missing shard(s)") and "train-000000.tar" in line
