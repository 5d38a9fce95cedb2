"""What a run leaves for its user: rows in metrics.csv also for a short run, progress in steps on stdout (a bar on a
terminal, plain lines in a log file), and the run folder where ``--run_name`` and ``trainer.default_root_dir`` say."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios

import pytest

from medclip_train.cli import LIGHTNING_LOG_EVERY_N_STEPS, log_interval
from tests.training.conftest import REPO, fit_args, read_metrics, read_summary, run_cli, train_py

# `step 4/6  loss 2.0794  samples/s 31.2  elapsed 0:00:01  eta 0:00:00`
STEP_LINE = re.compile(r"^step (\d+)/(\d+)  loss (\d+\.\d{4})  samples/s (\d+\.\d|\?)  elapsed \S+  eta \S+$")


@pytest.mark.parametrize(
    ("configured", "max_steps", "expected"),
    [(None, 30, 3), (None, 5, 1), (None, 300, 30), (None, 10_000, LIGHTNING_LOG_EVERY_N_STEPS), (7, 30, 7),
     (None, -1, None), (None, None, None)],
)  # fmt: skip
def test_log_interval_gives_a_short_run_about_ten_rows_and_keeps_a_set_value(configured, max_steps, expected):
    assert log_interval(configured, max_steps) == expected


def test_a_30_step_run_without_log_every_n_steps_writes_metrics_rows(tmp_path, shards, tok):
    # test_tiny.yaml logs every step; `null` is what a config that does not set it gives (Lightning's 50).
    args = [
        "--trainer.log_every_n_steps",
        "null",
        "--trainer.max_steps",
        "30",
        "--checkpoint.every_n_train_steps",
        "30",
    ]
    run_cli(fit_args(tok, shards([8, 8]), tmp_path / "run", *args))
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 10, "one row every 30 // 10 = 3 steps"
    assert [int(r["step"]) for r in rows] == list(range(2, 30, 3))  # Lightning's step column counts from 0
    assert read_summary(tmp_path / "run")["steps"] == 30


def test_run_name_makes_a_folder_under_default_root_dir(tmp_path, shards, tok, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a run folder under the working directory would land here, not in the repo
    root = tmp_path / "runs"
    run_cli(fit_args(tok, shards([8]), root, "--run_name", "exp1", "--trainer.max_steps", "2"))
    assert (root / "exp1" / "last.ckpt").is_file() and (root / "exp1" / "metrics.csv").is_file()
    assert read_summary(root / "exp1")["steps"] == 2
    assert not (tmp_path / "checkpoints").exists()
    assert sorted(p.name for p in root.iterdir()) == ["exp1"]


def test_run_name_without_default_root_dir_goes_to_checkpoints(tmp_path, shards, tok, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = fit_args(tok, shards([8]), tmp_path / "unused", "--run_name", "exp2", "--trainer.max_steps", "1")
    at = args.index("--trainer.default_root_dir")
    run_cli(args[:at] + args[at + 2 :])
    assert (tmp_path / "checkpoints" / "exp2" / "last.ckpt").is_file()


@pytest.mark.slow
def test_progress_without_a_terminal_is_plain_step_lines(tmp_path, shards, tok):
    args = ["--trainer.enable_progress_bar", "true", "--trainer.max_steps", "7", "--trainer.log_every_n_steps", "3"]
    args += ["--data.val", shards([8])]  # 16 train samples: an epoch is 2 steps, validated at its end
    proc = train_py(fit_args(tok, shards([8, 8]), tmp_path / "run", *args))  # stdout is a pipe
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    steps = [STEP_LINE.match(line) for line in out.splitlines() if line.startswith("step ")]
    assert all(steps), out
    assert [(int(m[1]), int(m[2])) for m in steps] == [(3, 7), (6, 7), (7, 7)]  # every 3 steps, and the last
    assert all(m[4] != "?" for m in steps[1:])
    validations = re.findall(r"^validation at step (\d+): val/loss \d+\.\d{4}$", out, re.M)
    assert validations == ["2", "4", "6"], out
    assert "\r" not in out and "Epoch" not in out  # no redrawn bar, no "Epoch 0/-2"


@pytest.mark.slow
def test_progress_on_a_terminal_is_one_redrawn_line_in_steps(tmp_path, shards, tok):
    args = ["--trainer.enable_progress_bar", "true", "--trainer.max_steps", "6"]
    command = [sys.executable, str(REPO / "train.py"), *fit_args(tok, shards([8, 8]), tmp_path / "run", *args)]
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # a new pty is 0 columns wide
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=follower, stderr=subprocess.DEVNULL)
    os.close(follower)
    out = b""
    while True:  # read as it comes: a full pty buffer would block the child
        ready, _, _ = select.select([leader], [], [], 240)
        if not ready:
            proc.kill()
            break
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0
    text = out.decode(errors="replace")
    redraws = [part.strip() for part in re.split(r"[\r\n]", text) if part.strip().startswith("step ")]
    assert redraws, text[-2000:]
    assert "\r" in text, "a bar redrawn in place"
    final = redraws[-1]
    assert final.startswith("step 6/6 ") and re.search(r"loss \d+\.\d{4}  samples/s \d+\.\d", final), final
    assert "eta" in final and "Epoch" not in text
