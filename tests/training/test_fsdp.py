"""FSDP and the training loop.

Lightning's FSDP strategies run on GPUs only (it refuses ``accelerator='cpu'``), so the CPU suite cannot check the
loop's GradCache re-forward, ``clip_grad_norm_`` over sharded parameters and the non-finite skip under them: the
CLI refuses them with one line until a GPU check has run.
"""

from __future__ import annotations

import pytest

from tests.training.conftest import fit_args, run_cli

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
    assert "--trainer.strategy ddp" in line and "GPU check" in line
    assert not (root / "last.ckpt").exists(), "no step was trained"
