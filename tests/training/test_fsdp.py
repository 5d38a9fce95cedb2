"""FSDP and the training loop.

FSDP2 (Lightning's ``ModelParallelStrategy``, ``fully_shard`` in ``CLIPModule.configure_model``) runs on CPU with
gloo: two ranks end a GradCache step with clipping where one process on the whole batch does, and resume. Lightning's
FSDP1 strategies run on GPUs only (it refuses ``accelerator='cpu'``), so the CPU suite cannot check the loop under
them: the CLI refuses them with one line, pointing to FSDP2.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch.utils.data import DataLoader

from tests.training import test_accumulation_ddp as accumulation_ddp
from tests.training.conftest import bare_trainer, fit_args, read_summary, run_cli, train_py

FSDP_CLASS = '{"class_path": "lightning.pytorch.strategies.FSDPStrategy"}'


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp_cpu_offload", "FSDPStrategy", FSDP_CLASS])
def test_fsdp_strategies_are_refused_with_one_line(tmp_path, shards, tok, capsys, strategy):
    root = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(fit_args(tok, shards([8]), root, "--trainer.strategy", strategy))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: trainer.strategy: ") and "FSDP" in line.upper(), err[-2000:]
    assert "--trainer.strategy ModelParallelStrategy" in line and "--trainer.strategy ddp" in line
    assert not (root / "last.ckpt").exists(), "no step was trained"


# ---- FSDP2 (Lightning's ModelParallelStrategy) on 2 gloo CPU ranks ---------------------------------------------------
# The clipping norm is below the first step's gradient norm, so that the clip runs and a norm taken over one rank's
# shards only would give other weights.
CLIP_NORM = 0.05


def _module(tokenizer: str, accumulation_steps: int):
    module = accumulation_ddp._module(tokenizer, accumulation_steps)  # same seed, same init as the DDP test
    module.grad_clip_norm = CLIP_NORM
    return module


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def _fit(module, batches: list[dict], max_steps: int, ckpt_path: str | None = None):
    from lightning.pytorch.strategies import ModelParallelStrategy

    # One checkpoint file (gathered on rank 0), as DDP writes, rather than a folder of shards.
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False)
    trainer = bare_trainer(
        max_steps=max_steps, precision="32-true", use_distributed_sampler=False, devices=2, strategy=strategy
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)
    return trainer


def _fsdp2_worker(rank: int, port: int, tokenizer: str, out_dir: str):
    torch.set_num_threads(1)  # two ranks on a small CPU host
    # LOCAL_RANK makes Lightning's environment "created externally": these two processes are the ranks.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", LOCAL_RANK=str(rank))
    module = _module(tokenizer, accumulation_ddp.ACCUMULATION)
    per_rank = accumulation_ddp.PER_RANK
    batch = {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in accumulation_ddp._global_batch(module).items()}
    trainer = _fit(module, [batch], max_steps=1)
    ckpt = os.path.join(out_dir, "step1.ckpt")
    trainer.save_checkpoint(ckpt)
    result = {"params": {n: _full(p) for n, p in module.model.named_parameters()}, "grad_norm": module._last_grad_norm}
    # Two steps in one run, and one step then a resume from its checkpoint (weights and AdamW state).
    straight = _module(tokenizer, accumulation_ddp.ACCUMULATION)
    _fit(straight, [batch, batch], max_steps=2)
    resumed = _module(tokenizer, accumulation_ddp.ACCUMULATION)
    _fit(resumed, [batch, batch], max_steps=2, ckpt_path=ckpt)
    result["two_steps"] = {n: _full(p) for n, p in straight.model.named_parameters()}
    result["resumed"] = {n: _full(p) for n, p in resumed.model.named_parameters()}
    result["sharded"] = sum(hasattr(p, "full_tensor") for p in module.model.parameters())
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_fsdp2_step_equals_one_process_on_the_global_batch_and_resumes(tmp_path, tiny_tokenizer_dir):
    """GradCache with 4 micro-batches, clipping and AdamW under FSDP2 on 2 ranks end the step with the weights of
    one process on the whole batch (the reference DDP is held to in test_accumulation_ddp.py), with the same global
    gradient norm; a resume from the step-1 checkpoint ends step 2 where an uninterrupted run does."""
    import torch.multiprocessing as mp

    port = accumulation_ddp._free_port()
    mp.spawn(_fsdp2_worker, args=(port, str(tiny_tokenizer_dir), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert ranks[0]["sharded"] > 0, "the parameters were sharded (DTensors)"

    reference = _module(str(tiny_tokenizer_dir), accumulation_steps=1)
    initial = {n: p.detach().clone() for n, p in reference.model.named_parameters()}
    bare_trainer(precision="32-true").fit(
        reference, train_dataloaders=DataLoader([accumulation_ddp._global_batch(reference)], batch_size=None)
    )
    assert float(reference._last_grad_norm) > CLIP_NORM, "the clip ran"
    moved = max((p.detach() - initial[n]).abs().max().item() for n, p in reference.model.named_parameters())
    assert moved > 1e-4, "a step far larger than the tolerance"
    for rank, result in enumerate(ranks):
        torch.testing.assert_close(result["grad_norm"], reference._last_grad_norm, atol=1e-5, rtol=1e-5)
        for name, ref in reference.model.named_parameters():
            torch.testing.assert_close(result["params"][name], ref.detach(), atol=1e-5, rtol=0, msg=f"{rank}: {name}")
        for name, two in result["two_steps"].items():
            torch.testing.assert_close(result["resumed"][name], two, atol=1e-6, rtol=0, msg=f"resumed {name}")


# The README's FSDP2 command, on 2 CPU processes started by Lightning.
FSDP2 = [
    *("--trainer.devices", "2", "--trainer.strategy", "ModelParallelStrategy"),
    *("--trainer.strategy.data_parallel_size", "2", "--trainer.strategy.tensor_parallel_size", "1"),
    *("--trainer.strategy.save_distributed_checkpoint", "false"),
]
# 16 samples, 2 ranks x batches of 2: 4 steps are one exact epoch. Whole-image crops: nothing random outside the
# checkpoint, so two resumes from one checkpoint can be compared weight for weight.
SMALL = ["--data.batch_size", "2", "--data.train_scale", "[1.0, 1.0]"]


def _train(args: list[str], log) -> None:
    proc = train_py(args, log=log)
    assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]


@pytest.mark.slow
def test_fsdp2_cli_run_resumes_under_fsdp2_and_under_ddp_and_exports(tmp_path, shards, tok):
    pattern = shards([8, 8])
    root, ddp_root = tmp_path / "run", tmp_path / "ddp"
    _train(fit_args(tok, pattern, root, *FSDP2, *SMALL, "--trainer.max_steps", "2"), tmp_path / "a.log")
    checkpoint = torch.load(root / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2, "one checkpoint file, gathered on rank 0"
    ddp_root.mkdir()
    shutil.copy(root / "last.ckpt", ddp_root / "last.ckpt")

    resume = ["--trainer.max_steps", "4", "--ckpt_path", "last"]
    _train(fit_args(tok, pattern, root, *FSDP2, *SMALL, *resume), tmp_path / "b.log")
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    _train(fit_args(tok, pattern, ddp_root, *ddp, *SMALL, *resume), tmp_path / "c.log")
    for folder in (root, ddp_root):
        summary = read_summary(folder)
        assert (summary["steps"], summary["steps_this_run"], summary["samples_seen"]) == (4, 2, 16), folder.name
    fsdp2 = torch.load(root / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    resumed_ddp = torch.load(ddp_root / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert fsdp2.keys() == resumed_ddp.keys()
    for name, value in fsdp2.items():
        torch.testing.assert_close(resumed_ddp[name], value, atol=1e-6, rtol=0, msg=name)

    from medclip_train.export import main as export

    assert export(["--checkpoint", str(root / "last.ckpt"), "--output", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "open_clip_model.safetensors").is_file()


def test_fsdp2_with_distributed_checkpoints_is_refused_naming_the_flag(tmp_path, shards, tok, capsys):
    """Lightning's ModelParallelStrategy writes a folder of shards per checkpoint unless told otherwise; resume and
    export read one file, so the default is refused before anything is built."""
    root = tmp_path / "run"
    strategy = ["--trainer.strategy", "ModelParallelStrategy", "--trainer.strategy.data_parallel_size", "1"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(fit_args(tok, shards([8]), root, *strategy, "--trainer.strategy.tensor_parallel_size", "1"))
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: trainer.strategy.save_distributed_checkpoint") and "false" in line, line
    assert not root.exists() or not any(root.iterdir()), "nothing written"
