"""bf16 mixed precision on CPU trains; non-finite steps are skipped and counted, and repeated ones stop the run."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from medclip_train.config import ModelConfig
from medclip_train.data.datamodule import WebDataModule
from medclip_train.module import CLIPModule, NonFiniteLossError
from tests.training.conftest import (
    InitialWeights,
    NaNLoss,
    callback_arg,
    fit_args,
    read_metrics,
    read_summary,
    run_cli,
)


def find_callback(cli, cls):
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, cls))


def fixed_batch_loss(module: CLIPModule, state: dict, batch: dict) -> float:
    """The contrastive loss of ``state`` on ``batch``, in fp32 and eval mode."""
    module.model.load_state_dict(state)
    module.model.eval()
    with torch.no_grad():
        out = module.model(module.images(batch), batch["text"])
        return float(module.loss(out)["loss"])


def test_bf16_mixed_on_cpu_trains(tmp_path, shards, tok):
    pattern = shards([8, 8])
    root = tmp_path / "run"
    options = "--trainer.precision bf16-mixed --trainer.max_steps 20 --checkpoint.every_n_train_steps 100".split()
    options += "--model.optim.lr 1e-3 --model.optim.schedule constant --model.optim.warmup_steps 4".split()
    keep_initial = ("--trainer.callbacks+", callback_arg(InitialWeights))
    cli = run_cli(fit_args(tok, pattern, root, *options, *keep_initial))
    summary = read_summary(root)
    assert summary["precision"] == "bf16-mixed" and summary["steps"] == 20 and summary["skipped_steps"] == 0
    losses = [float(row["train/loss"]) for row in read_metrics(root)]
    assert all(math.isfinite(v) for v in losses)

    # Before and after, in fp32 on the 16 training samples.
    module = CLIPModule(ModelConfig(preset="tiny", tokenizer=str(tok)))
    dm = WebDataModule(train=pattern, batch_size=16, num_workers=0, shuffle_buffer=0)
    dm.connect(module.tokenizer, module.preprocess_cfg)
    loader = dm.train_dataloader()
    loader.dataset.spec.shuffle = False
    batch = next(iter(loader))
    before = fixed_batch_loss(module, find_callback(cli, InitialWeights).state, batch)
    after = fixed_batch_loss(module, cli.model.model.state_dict(), batch)
    assert after < 0.85 * before, (before, after)


def test_a_nan_step_is_skipped_counted_and_leaves_the_weights_alone(tmp_path, shards, tok):
    root = tmp_path / "run"
    options = "--trainer.precision bf16-mixed --trainer.max_steps 6".split()
    cli = run_cli(fit_args(tok, shards([16]), root, *options, "--trainer.callbacks+", callback_arg(NaNLoss, steps=[3])))
    summary = read_summary(root)
    assert summary["steps"] == 6 and summary["skipped_steps"] == 1
    assert math.isfinite(summary["final_loss"])
    # The poisoned step changed nothing, not even AdamW's moments; every other step did change the weights.
    assert find_callback(cli, NaNLoss).unchanged == {0: False, 1: False, 2: False, 3: True, 4: False, 5: False}
    rows = read_metrics(root, "train/skipped_steps")
    assert [float(r["train/skipped_steps"]) for r in rows] == [0, 0, 0, 1, 1, 1]


def test_repeated_nan_steps_stop_the_run_with_advice(tmp_path, shards, tok):
    root = tmp_path / "run"
    options = "--trainer.max_steps 20 --model.max_consecutive_skips 3".split()
    with pytest.raises(NonFiniteLossError) as err:
        run_cli(fit_args(tok, shards([16]), root, *options, "--trainer.callbacks+", callback_arg(NaNLoss)))
    message = str(err.value)
    assert message.startswith("3 consecutive steps had a non-finite loss")
    for advice in ("bf16-mixed", "model.optim.lr", "warmup_steps", "model.grad_clip_norm"):
        assert advice in message
    assert len(read_metrics(root)) <= 3, "the run stopped at the third skip"


class DtypeProbe(L.Callback):
    """Records, after each optimizer step, the dtypes of the parameters and of AdamW's moments."""

    def __init__(self):
        self.dtypes: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        opt = trainer.optimizers[0]
        moments = {v.dtype for st in opt.state.values() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq")}
        params = {p.dtype for p in pl_module.model.parameters()}
        self.dtypes.append({"params": sorted(map(str, params)), "moments": sorted(map(str, moments))})


def test_bf16_true_keeps_weights_and_adamw_state_in_bf16_resumes_and_exports(tmp_path, shards, tok):
    """Lightning's ``bf16-true`` (open_clip's ``--precision pure_bf16``) with the manual-optimisation step: the loss
    stays finite, parameters and AdamW moments are bf16, last.ckpt resumes, and the export loads."""
    from medclip_train.export import export_checkpoint
    from medclip_train.model.loading import load_project_checkpoint

    pattern = shards([16, 16])
    root = tmp_path / "run"
    options = "--trainer.precision bf16-true --checkpoint.every_n_train_steps 4".split()
    options += "--model.optim.lr 1e-3 --model.optim.schedule constant --model.optim.warmup_steps 2".split()
    cli = run_cli(
        fit_args(
            tok, pattern, root, *options, "--trainer.max_steps", "4", "--trainer.callbacks+", callback_arg(DtypeProbe)
        )
    )
    probe = find_callback(cli, DtypeProbe)
    assert probe.dtypes and all(
        d == {"params": ["torch.bfloat16"], "moments": ["torch.bfloat16"]} for d in probe.dtypes
    )
    summary = read_summary(root)
    assert summary["precision"] == "bf16-true" and summary["steps"] == 4 and summary["skipped_steps"] == 0
    assert all(math.isfinite(float(row["train/loss"])) for row in read_metrics(root))

    ckpt = torch.load(root / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    assert {v.dtype for k, v in ckpt["state_dict"].items() if k.startswith("model.") and v.is_floating_point()} == {
        torch.bfloat16
    }
    cli = run_cli(fit_args(tok, pattern, root, *options, "--trainer.max_steps", "8", "--ckpt_path", "last"))
    assert read_summary(root)["steps"] == 8 and cli.trainer.global_step == 8
    assert {p.dtype for p in cli.model.model.parameters()} == {torch.bfloat16}

    folder = export_checkpoint(str(root / "last.ckpt"), str(tmp_path / "export"))
    loaded = load_project_checkpoint(root / "last.ckpt")
    trained = {
        k[len("model.") :]: v
        for k, v in torch.load(root / "last.ckpt", weights_only=True)["state_dict"].items()
        if k.startswith("model.")
    }
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value.to(trained[name].dtype), trained[name]), name
    assert (folder / "open_clip_model.safetensors").exists()


def test_slow_bf16_message_names_the_rates_and_the_precision_to_use():
    from medclip_train.hardware import slow_bf16_message

    # AVX2 EPYC, measured: bf16 1.1 GFLOP/s, fp32 167 -> warned, 152x; AVX512-BF16: 945 vs 224 -> nothing to say.
    message = slow_bf16_message("bf16-mixed", 1.1, 167.0)
    assert message.startswith("trainer.precision=bf16-mixed on a CPU without a fast bf16 matmul")
    assert "1.1 GFLOP/s in bf16 against 167 in fp32" in message and "about 152x slower" in message
    assert message.endswith("with trainer.precision=32-true")
    assert slow_bf16_message("bf16-true", 945.0, 224.0) is None
    assert slow_bf16_message("bf16-mixed", 0.25 * 200.0, 200.0) is None  # the threshold itself is not slow
    assert slow_bf16_message("32-true", 1.1, 167.0) is None


def test_matmul_probe_measures_the_rate_of_a_real_mm():
    from medclip_train.hardware import matmul_gflops

    # 2 * 256**3 FLOP: a rate above 1 GFLOP/s means each mm took under 34 ms, below 1e5 that it was not skipped.
    for dtype in (torch.float32, torch.bfloat16):
        assert 0.1 < matmul_gflops(dtype) < 1e5


@pytest.mark.parametrize("precision, warned", [("bf16-mixed", True), ("32-true", False)])
def test_a_bf16_fit_on_a_cpu_with_slow_bf16_warns_with_the_flag_to_change(
    tmp_path, shards, tok, monkeypatch, recwarn, precision, warned
):
    """The probe is our own code; it is replaced by an AVX2 CPU's measured rates so that the test does not depend on
    the CPU it runs on (this suite's machines have had both kinds)."""
    import medclip_train.hardware as hardware

    rates = {torch.bfloat16: 1.1, torch.float32: 167.0}
    probed = []
    monkeypatch.setattr(hardware, "matmul_gflops", lambda dtype, **kw: probed.append(dtype) or rates[dtype])
    options = f"--trainer.precision {precision} --trainer.max_steps 1".split()
    run_cli(fit_args(tok, shards([8]), tmp_path / "run", *options))
    ours = [str(w.message) for w in recwarn if "without a fast bf16 matmul" in str(w.message)]
    assert len(ours) == int(warned)
    assert bool(probed) == warned, "the probe runs only for a bf16 precision"
    if warned:
        assert "trainer.precision=32-true" in ours[0]
