"""``model.ema_decay``: the moving average of the weights against a hand-computed one, through a checkpoint and a
resume, evaluated beside the weights, and exported with ``medclip-export --ema``."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from medclip_train import export
from medclip_train.config import ModelConfig
from medclip_train.data.datamodule import WebDataModule
from medclip_train.module import EMA_PREFIX, CLIPModule
from tests.training.conftest import bare_trainer, fit_args, run_cli

DECAY = 0.5  # large steps of the average, so that a wrong update order or decay shows
RUN = ["--data.batch_size", "4", "--model.ema_decay", str(DECAY)]


class WeightsAfterEachStep(L.Callback):
    def __init__(self):
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})


def test_the_average_is_the_hand_computed_ema_of_each_steps_weights(tmp_path, shards, tiny_tokenizer_dir):
    module = CLIPModule(ModelConfig(preset="tiny", tokenizer=str(tiny_tokenizer_dir)), ema_decay=DECAY)
    dm = WebDataModule(train=shards([8, 8]), batch_size=4, num_workers=0)
    dm.connect(module.tokenizer, module.preprocess_cfg)
    seen = WeightsAfterEachStep()
    bare_trainer(max_steps=3, callbacks=[seen]).fit(module, datamodule=dm)
    expected = dict(seen.weights[0])  # the first update copies the weights
    for step in seen.weights[1:]:
        expected = {k: DECAY * expected[k] + (1 - DECAY) * w if w.is_floating_point() else w for k, w in step.items()}
    average = module.ema.module.state_dict()
    assert int(module.ema.n_averaged) == 3
    for name, value in expected.items():
        torch.testing.assert_close(average[name], value, rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(average["logit_scale"], seen.weights[-1]["logit_scale"]), "an average, not the weights"


def test_the_in_training_evaluation_scores_the_average_beside_the_weights(tmp_path, shards, tiny_tokenizer_dir):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from medclip_train.callbacks import EvalCallback
    from medclip_train.evaluation.suite import evaluate_suite
    from tests.evaluation.conftest import write_image_folder

    folder = write_image_folder(tmp_path / "organs", ["brain", "lymph"], per_class=3)
    module = CLIPModule(ModelConfig(preset="tiny", tokenizer=str(tiny_tokenizer_dir)), ema_decay=DECAY)
    dm = WebDataModule(train=shards([8]), batch_size=4, num_workers=0)
    dm.connect(module.tokenizer, module.preprocess_cfg)
    evaluation = EvalCallback(zeroshot_tasks=[str(folder)], at_end=True)
    bare_trainer(max_steps=2, callbacks=[evaluation]).fit(module, datamodule=dm)
    preprocess = image_transform_v2(PreprocessCfg(**module.preprocess_cfg), is_train=False)
    on_average = evaluate_suite(module.ema.module, module.tokenizer, preprocess, [str(folder)], None, max_samples=1000)
    assert on_average and {f"ema/{k}": float(v) for k, v in on_average.items()} == {
        k: v for k, v in evaluation.last_metrics.items() if k.startswith("ema/")
    }
    assert {k for k in evaluation.last_metrics if not k.startswith("ema/")} == set(on_average)


def ema_state(path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k[len(EMA_PREFIX) :]: v for k, v in state.items() if k.startswith(EMA_PREFIX)}


def model_state(path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}


def test_the_average_resumes_exports_and_can_be_turned_on_later(tmp_path, shards, tok, capsys):
    pattern = shards([8, 8])
    root, late = tmp_path / "run", tmp_path / "late"
    every_step = ("--checkpoint.every_n_train_steps", "1")
    run_cli(fit_args(tok, pattern, root, *RUN, *every_step, "--trainer.max_steps", "2"))
    run_cli(fit_args(tok, pattern, root, *RUN, *every_step, "--trainer.max_steps", "4", "--ckpt_path", "last"))
    # The resumed run continues the checkpoint's average with its own steps' weights.
    expected = ema_state(root / "step0000002.ckpt")
    for step in (3, 4):
        weights = model_state(root / f"step{step:07d}.ckpt")
        expected = {k: DECAY * v + (1 - DECAY) * weights[k] if v.is_floating_point() else weights[k]
                    for k, v in expected.items()}  # fmt: skip
    average = ema_state(root / "last.ckpt")
    assert average.keys() == expected.keys() and len(average) > 10
    for name, value in expected.items():
        torch.testing.assert_close(average[name], value, rtol=1e-6, atol=1e-7, msg=name)

    out = tmp_path / "export"
    assert export.main(["--checkpoint", str(root / "last.ckpt"), "--output", str(out), "--ema"]) == 0
    exported = load_file(out / "open_clip_model.safetensors")
    assert exported.keys() == average.keys() and all(torch.equal(exported[k], v) for k, v in average.items())

    # A run without an average, resumed with one: it starts from the checkpoint's weights, said in a warning.
    run_cli(fit_args(tok, pattern, late, "--data.batch_size", "4", "--trainer.max_steps", "2"))
    assert not ema_state(late / "last.ckpt")
    with pytest.warns(UserWarning, match="no moving average"):
        run_cli(fit_args(tok, pattern, late, *RUN, "--trainer.max_steps", "3", "--ckpt_path", "last"))
    ckpt = torch.load(late / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert int(ckpt["ema.n_averaged"]) == 1, "one update since the resume: a copy of the step-3 weights"
    assert all(torch.equal(v, ckpt[f"model.{k}"]) for k, v in ema_state(late / "last.ckpt").items())


def test_export_ema_of_a_checkpoint_without_one_is_one_line(tmp_path, shards, tok, capsys):
    root = tmp_path / "run"
    run_cli(fit_args(tok, shards([8]), root, "--data.batch_size", "4", "--trainer.max_steps", "1"))
    capsys.readouterr()
    code = export.main(["--checkpoint", str(root / "last.ckpt"), "--output", str(tmp_path / "out"), "--ema"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--ema" in err and "model.ema_decay" in err, err
    assert not (tmp_path / "out" / "open_clip_model.safetensors").exists()
