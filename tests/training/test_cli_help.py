"""``train.py fit --help`` documents this package's options from their docstrings, not just their types."""

from __future__ import annotations

import re

import pytest

from medclip_train.cli import cli_main


@pytest.fixture(scope="module")
def fit_help() -> dict[str, str]:
    """Option -> its help text (one line of words), from ``fit --help`` as printed."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        cli_main(["fit", "--help"])
    assert stop.value.code == 0
    text = out.getvalue()
    assert not re.search(r"^Args:", text, re.M), "a group titled 'Args:': an __init__ docstring without its summary"
    blocks = {}
    # An option line is `  --name METAVAR` (help on the same line after 2+ spaces, or on the indented lines below).
    for match in re.finditer(r"^  (--[\w.+]+)(?:[^\n]*?)(?: {2,}(\S[^\n]*))?\n((?: {10,}[^\n]*\n)*)", text, re.M):
        option, same_line, below = match.group(1), match.group(2) or "", match.group(3)
        blocks.setdefault(option, " ".join((same_line + " " + below).split()))
    return blocks


@pytest.mark.parametrize(
    ("option", "documented"),
    [
        ("--data.epoch_mode", "``exact`` (each sample once per epoch, counts from ``sizes.json``) or ``resampled``"),
        ("--model.clip.preset", "Towers, sizes and image preprocessing: a key of ``PRESETS``"),
        ("--model.clip.context_length", "Text tokens per caption, [CLS] and [SEP] included"),
        ("--model.loss.w_sm", "Weight of MedCLIP's semantic matching loss"),
        ("--model.optim.warmup_steps", "Linear warmup from 0 to ``lr``"),
        ("--model.accumulation_steps", "Exact contrastive accumulation"),
        ("--eval.every_n_steps", "Evaluate every this many optimizer steps"),
        ("--run_name", "<trainer.default_root_dir or checkpoints>/<run_name>/"),
    ],
)
def test_fit_help_shows_the_docstring_of_an_option(fit_help, option, documented):
    assert option in fit_help, f"{option} is not in fit --help"
    assert documented in fit_help[option], fit_help[option]


def test_every_option_of_this_package_has_a_description(fit_help):
    ours = [o for o in fit_help if o.split(".")[0] in ("--model", "--data", "--eval") and "." in o]
    ours = [o for o in ours if not o.endswith((".help", "+"))]
    assert len(ours) > 50, ours  # model.clip/loss/optim fields one by one, not one opaque --model.clip
    undocumented = [o for o in ours if fit_help[o].startswith("(type:")]
    assert not undocumented, f"no description in fit --help: {undocumented}"
