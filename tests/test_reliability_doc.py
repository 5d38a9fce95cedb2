"""RELIABILITY.md names a test for every row: each named test must exist, so the matrix cannot drift from the suite.

A cell names tests as `path::name` (relative to tests/), `path` alone, or `::name` after a cell's earlier path."""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
DOC = TESTS.parent / "RELIABILITY.md"


def _functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _references() -> list[tuple[str, str | None]]:
    refs = []
    for line in DOC.read_text().splitlines():
        if not line.startswith("| "):
            continue
        path = None
        for code in re.findall(r"`([^`]+)`", line):
            match = re.fullmatch(r"((?:[\w/]+/)?test_\w+\.py)?(?:::(\w+)(?:\[[^\]]*\])?)?", code.strip())
            if not match or not (match.group(1) or match.group(2)):
                continue
            path = match.group(1) or path
            if path is not None:
                refs.append((path, match.group(2)))
    return refs


def test_every_test_the_reliability_matrix_names_exists():
    refs = _references()
    assert len(refs) > 50, "the parser found too few references: has the table format changed?"
    missing = []
    for path, name in refs:
        file = TESTS / path
        if not file.is_file():
            missing.append(path)
        elif name is not None and name not in _functions(file):
            missing.append(f"{path}::{name}")
    assert not missing, f"RELIABILITY.md names tests that do not exist: {sorted(set(missing))}"
