"""README's commands run as written: every option they use exists in the parser of that command and subcommand, every
shipped ``--config`` file exists, and the complete ones parse.

The commands are the lines of README's ``bash`` blocks (``\\`` continuations joined, comments dropped) and its inline
code spans that start with a command. The parsers are the real ones: the console scripts' functions named in
pyproject.toml (``build_parser`` of data_prep/cli.py, medclip_train/evaluation/cli.py, medclip_train/export.py), and
the LightningCLI parser of ``train.py`` / ``medclip-train`` as ``cli_main`` builds it (captured, nothing is run).
A ``--config`` outside ``configs/`` (``mine.yaml``) is the reader's own file: not checked, and that line is not
parsed whole. Lines with a placeholder (``...``, ``<name>``, ``csv|jsonl``) get the option check only.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def console_scripts() -> dict[str, str]:
    """``[project.scripts]`` of pyproject.toml: the functions the installed commands run."""
    try:
        import tomllib  # Python 3.11+
    except ImportError:  # 3.10: the installed package's entry points, written from the same table
        from importlib.metadata import distribution

        return {e.name: e.value for e in distribution("medclip-train").entry_points if e.group == "console_scripts"}
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


SCRIPTS = console_scripts()
LIGHTNING_SCRIPT = "medclip-train"  # the same CLI as `python train.py`
LAUNCHERS = {"srun", "torchrun", "mpirun"}  # their own options come before `[python] train.py`

# README lines that fail today, by (command, subcommand, option): fixed in README, their entry is removed here.
# Each is listed with the corrected line in /tmp/notes/cli_help.md.
KNOWN_README_ERRORS: dict[tuple[str, str | None, str], str] = {}


@dataclass(frozen=True)
class Command:
    where: str  # README line, for the test id and messages
    text: str
    script: str  # console script name; `python train.py` is medclip-train
    args: tuple[str, ...]
    subcommand: str | None  # the first positional argument, when the script has subcommands

    def options(self) -> list[str]:
        """The options as written, without values (``--input=x`` -> ``--input``; ``--trainer.logger+=X`` ->
        ``--trainer.logger+``)."""
        return [a.split("=", 1)[0] for a in self.args if a.startswith("-") and not _is_number(a)]

    def placeholders(self) -> bool:
        sub = self.subcommand or ""
        return any(a == "..." or a.endswith("...") for a in self.args) or "|" in sub or sub.startswith("<")

    def configs(self) -> list[str]:
        found = []
        for i, arg in enumerate(self.args):
            if arg == "--config" and i + 1 < len(self.args):
                found.append(self.args[i + 1])
            elif arg.startswith("--config="):
                found.append(arg.split("=", 1)[1])
        return found


def _is_number(text: str) -> bool:
    with contextlib.suppress(ValueError):
        float(text)
        return True
    return False


# ---- reading README ------------------------------------------------------------------------------------------------
FENCED = re.compile(r"^```([^\n]*)\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def shell_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, joined line) of every line of the ``bash`` blocks of ``text``."""
    found = []
    for block in FENCED.finditer(text):
        if block.group(1).strip() != "bash":
            continue
        first_line = text.count("\n", 0, block.start(2)) + 1
        pending, start = "", None
        for offset, line in enumerate(block.group(2).split("\n")):
            start = first_line + offset if start is None else start
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            found.append((start, pending + line))
            pending, start = "", None
    return found


def inline_spans(text: str) -> list[tuple[int, str]]:
    """(line number, text) of the inline code spans outside fenced blocks."""
    outside = FENCED.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return [(outside.count("\n", 0, m.start()) + 1, m.group(1)) for m in INLINE.finditer(outside)]


def as_command(where: str, line: str, inline: bool = False) -> Command | None:
    """The command a shell line runs, if it is one of this project's; ``None`` for anything else, and for an
    inline span without options (a mention in prose or a heading: "`medclip-prep medmnist` writes")."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:  # unbalanced quotes: prose in a code span, not a command
        return None
    while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):  # VAR=value command ...
        tokens = tokens[1:]
    if not tokens:
        return None
    program = os.path.basename(tokens[0])  # .venv/bin/medclip-prep
    if program in SCRIPTS:
        script, args = program, tokens[1:]
    elif (program.startswith("python") or program in LAUNCHERS) and "train.py" in tokens:
        if program not in LAUNCHERS and tokens[1] != "train.py":  # python -c "...", python -m bench
            return None
        script, args = LIGHTNING_SCRIPT, tokens[tokens.index("train.py") + 1 :]
    else:
        return None
    if inline and not any(a.startswith("-") for a in args):
        return None
    sub = next((a for a in args if not a.startswith("-")), None) if has_subcommands(script) else None
    return Command(where, line.strip(), script, tuple(args), sub)


def readme_commands(text: str, name: str = "README.md") -> list[Command]:
    lines = [(n, line, "bash") for n, line in shell_lines(text)] + [(n, s, "inline") for n, s in inline_spans(text)]
    commands = [as_command(f"{name}:{n} ({kind})", line, kind == "inline") for n, line, kind in lines]
    return [c for c in commands if c is not None]


# ---- the real parsers ----------------------------------------------------------------------------------------------
_LIGHTNING_PARSER = []


def lightning_parser():
    """The parser ``cli_main`` builds (``train.py``, ``medclip-train``), captured before it parses anything."""
    if not _LIGHTNING_PARSER:
        from jsonargparse import capture_parser

        from medclip_train.cli import cli_main

        _LIGHTNING_PARSER.append(capture_parser(lambda: cli_main(["fit"])))
    return _LIGHTNING_PARSER[0]


def script_module(script: str):
    module, _, function = SCRIPTS[script].partition(":")
    return importlib.import_module(module), function


def parser_of(script: str):
    if script == LIGHTNING_SCRIPT:
        return lightning_parser()
    module, _ = script_module(script)
    return module.build_parser()


def has_subcommands(script: str) -> bool:
    return script == LIGHTNING_SCRIPT or bool(subparsers(parser_of(script)))


def subparsers(parser) -> dict:
    action = getattr(parser, "_subcommands_action", None)  # jsonargparse
    if action is None:
        action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    return dict(action.choices) if action is not None else {}


def parsers_for(command: Command) -> dict[str, argparse.ArgumentParser]:
    """The (sub)parsers the command's options must exist in: one, or every alternative of ``csv|jsonl``/``<name>``."""
    parser = parser_of(command.script)
    choices = subparsers(parser)
    sub = command.subcommand
    if not choices or sub is None:
        return {"": parser}
    if sub.startswith("<"):
        return choices
    return {name: choices.get(name) for name in sub.split("|")}


def unknown_options(command: Command, parser) -> list[str]:
    known = parser._option_string_actions
    unknown = []
    for option in command.options():
        if option in known:
            continue
        # `--trainer.logger.offline`: an option of the class given to `--trainer.logger` (it has `--X.help`).
        parts = option.split(".")
        if any(".".join(parts[:i]) + ".help" in known for i in range(1, len(parts))):
            continue
        unknown.append(option)
    return unknown


def known_error(command: Command) -> str | None:
    for option in command.options():
        reason = KNOWN_README_ERRORS.get((command.script, command.subcommand, option))
        if reason:
            return reason
    return None


def params(commands: list[Command]) -> list:
    marks = []
    for c in commands:
        reason = known_error(c)
        mark = [pytest.mark.xfail(strict=True, reason=f"README: {reason}")] if reason else []
        marks.append(pytest.param(c, id=f"{c.where} {c.script} {c.subcommand or ''}".strip(), marks=mark))
    return marks


COMMANDS = readme_commands(README.read_text(encoding="utf-8"))


# ---- tests ---------------------------------------------------------------------------------------------------------
def test_readme_has_commands_of_every_script():
    scripts = {c.script for c in COMMANDS}
    assert scripts >= set(SCRIPTS), f"no README command of {set(SCRIPTS) - scripts}"


@pytest.mark.parametrize("command", params(COMMANDS))
def test_readme_command_uses_real_options_and_shipped_configs(command, capsys, monkeypatch):
    for name, parser in parsers_for(command).items():
        assert parser is not None, f"{command.where}: {command.script} has no subcommand {name!r}: {command.text}"
        unknown = unknown_options(command, parser)
        where = f"{command.script} {name}".strip()
        assert not unknown, f"{command.where}: {where} has no option {', '.join(unknown)}: {command.text}"
    shipped = [c for c in command.configs() if c.startswith("configs/")]
    missing = [c for c in shipped if not (REPO / c).is_file()]
    assert not missing, f"{command.where}: no config file {', '.join(missing)} in the repo: {command.text}"
    if command.placeholders() or len(shipped) < len(command.configs()):
        return
    # The whole line through the real parser: values, required options, config contents (nothing runs).
    monkeypatch.chdir(REPO)
    code = 0
    try:
        parser_of(command.script).parse_args(list(command.args))
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    assert code == 0, f"{command.where}: {command.text}\n{err.strip()[-1500:]}"


def help_pairs() -> dict[tuple[str, str | None], set[str]]:
    """(script, subcommand) -> the options README uses with it; ``csv|jsonl`` and ``<name>`` count for each."""
    pairs: dict[tuple[str, str | None], set[str]] = {}
    for command in COMMANDS:
        if command.script == LIGHTNING_SCRIPT:  # `train.py fit --help` runs in the test above (and test_cli_help)
            continue
        for name, parser in parsers_for(command).items():
            if parser is not None:
                pairs.setdefault((command.script, name or None), set()).update(command.options())
    return pairs


def _help_params() -> list:
    out = []
    for (script, sub), used in sorted(help_pairs().items(), key=str):
        reasons = [KNOWN_README_ERRORS.get((script, sub, option)) for option in sorted(used)]
        reason = next((r for r in reasons if r), None)
        mark = [pytest.mark.xfail(strict=True, reason=f"README: {reason}")] if reason else []
        out.append(pytest.param(script, sub, sorted(used), id=f"{script} {sub or ''}".strip(), marks=mark))
    return out


@pytest.mark.parametrize(("script", "sub", "used"), _help_params())
def test_help_of_each_readme_subcommand_runs_and_lists_its_options(script, sub, used, capsys):
    module, function = script_module(script)  # the console script's own function, as the installed command runs it
    with pytest.raises(SystemExit) as stop:
        getattr(module, function)([*([sub] if sub else []), "--help"])
    assert stop.value.code == 0
    shown = capsys.readouterr().out
    assert f"usage: {script}" in shown
    missing = sorted(o for o in used if not re.search(rf"(^|[\s,\[]){re.escape(o)}(?=[\s,=\]]|$)", shown, re.M))
    assert not missing, f"{script} {sub or ''} --help does not list {missing}, which README uses"


PLACEHOLDER_OPTIONS = {"--key"}  # "later files and `--key value` flags override earlier ones"


def all_options() -> set[str]:
    """Every option of every command and subcommand (``medclip-prep <name> --help`` lists the common options: ...)."""
    found = set()
    for script in SCRIPTS:
        parser = parser_of(script)
        for sub in [parser, *subparsers(parser).values()]:
            found |= set(sub._option_string_actions)
    return found


def test_options_named_alone_in_readme_exist():
    """Inline spans that are options without a command: a dotted one (``--trainer.strategy fsdp``) is an option of
    ``train.py fit``; any other must be an option of some command."""
    fit = subparsers(lightning_parser())["fit"]
    everything = all_options()
    wrong = []
    for n, span in inline_spans(README.read_text(encoding="utf-8")):
        if not span.startswith("--"):
            continue
        command = Command(f"README.md:{n}", span, LIGHTNING_SCRIPT, tuple(shlex.split(span)), "fit")
        options = [o for o in command.options() if o not in PLACEHOLDER_OPTIONS]
        dotted = [o for o in options if "." in o]
        wrong += [f"{command.where}: {o}" for o in unknown_options(command, fit) if o in dotted]
        wrong += [f"{command.where}: {o}" for o in options if "." not in o and o not in everything]
    assert not wrong, f"README names options that no command has: {wrong}"


def test_every_known_readme_error_is_still_in_readme():
    """An entry of KNOWN_README_ERRORS whose README line was fixed must go, so that the line is tested again."""
    used = {(c.script, c.subcommand, o) for c in COMMANDS for o in c.options()}
    stale = sorted(set(KNOWN_README_ERRORS) - used)
    assert not stale, f"README no longer has {stale}: remove them from KNOWN_README_ERRORS"


# The forms of the "Your own data" section: repeated options, SPLIT=FILE values, quoted globs, `.venv/bin/`, comments.
OWN_DATA = """
```bash
# 1. Shards
medclip-prep jsonl --input train=release/train.jsonl --input test=release/test.jsonl --images release/images \\
    --image-column image --caption-column Description.Caption --modality-column Description.Modality \\
    --source mine --output shards/mine   # trailing comment
medclip-prep tokenizer --input 'shards/mine/train-*.tar' --output shards/mine/tokenizer --vocab-size 4096
.venv/bin/medclip-prep inspect shards/mine --tokenizer shards/mine/tokenizer --context-length 32
#      train: p50=19  p90=37.4  max=59
HF_HUB_OFFLINE=1 python train.py fit --config configs/demo_cpu.yaml --config mine.yaml
medclip-prep jsonl --input a.jsonl --caption-colum text --image-column path --output x
```
and `srun python train.py fit --config configs/demo_cpu.yaml --trainer.num_nodes 4` inline.
"""


def test_checker_reads_the_own_data_forms():
    commands = readme_commands(OWN_DATA, "sample")
    assert [(c.script, c.subcommand) for c in commands] == [
        ("medclip-prep", "jsonl"),
        ("medclip-prep", "tokenizer"),
        ("medclip-prep", "inspect"),
        ("medclip-train", "fit"),
        ("medclip-prep", "jsonl"),
        ("medclip-train", "fit"),
    ]
    jsonl, tokenizer, inspect, fit, typo, srun = commands
    assert jsonl.where == "sample:4 (bash)" and jsonl.options().count("--input") == 2
    assert "train=release/train.jsonl" in jsonl.args and "--source" in jsonl.options()
    assert tokenizer.args[2] == "shards/mine/train-*.tar"  # the quotes are the shell's
    assert fit.configs() == ["configs/demo_cpu.yaml", "mine.yaml"]
    assert srun.args[-2:] == ("--trainer.num_nodes", "4")
    for command in (jsonl, tokenizer, inspect):
        assert unknown_options(command, parsers_for(command)[command.subcommand]) == []
        parser_of(command.script).parse_args(list(command.args))  # complete lines parse
    assert unknown_options(typo, parsers_for(typo)["jsonl"]) == ["--caption-colum"]  # no abbreviation passes
