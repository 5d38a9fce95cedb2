"""The package's imports go one way: no cycle between modules, no import of a higher layer.

Every module of medclip_train/ and data_prep/ is parsed with ``ast``, its imports at module level and inside
functions alike (a function-level import hides a cycle from Python, not from a reader), relative ones resolved.
Layers, lowest first: config -> model -> losses/data -> module -> cli, evaluation beside module (it may import
model, data and config, not module or cli). data_prep sits beside them too and may import the library's lower
layers (config, model, data), never its training module or CLI; the library never imports data_prep.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("medclip_train", "data_prep")

# Module -> layer; the longest matching dotted prefix wins.
LAYER_OF = {
    "medclip_train": "base",  # the package itself (__init__) and helpers every layer may use
    "medclip_train.atomic_files": "base",
    "medclip_train.config": "config",
    "medclip_train.presets": "config",  # the preset catalogue the config validates against: plain data
    "medclip_train.model": "model",
    "medclip_train.data": "losses/data",
    "medclip_train.losses": "losses/data",
    "medclip_train.distributed": "losses/data",
    "medclip_train.optim": "losses/data",
    "medclip_train.module": "module",
    "medclip_train.callbacks": "module",
    "medclip_train.resume": "module",
    "medclip_train.run_dir": "module",
    "medclip_train.remote": "module",  # checkpoints mirrored to object storage
    "medclip_train.export": "module",
    "medclip_train.evaluation": "evaluation",
    "medclip_train.cli": "cli",
    "data_prep": "data_prep",
}
_LOWER = {"base", "config", "model", "losses/data"}
# What each layer may import besides itself.
MAY_IMPORT = {
    "base": set(),
    "config": {"base"},
    "model": {"base", "config"},
    "losses/data": {"base", "config", "model"},
    "evaluation": _LOWER,
    "module": _LOWER | {"evaluation"},  # callbacks run the in-loop evaluation
    "data_prep": _LOWER,
    "cli": _LOWER | {"module", "evaluation"},
}


def find_modules(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` of the packages (a package is its ``__init__.py``)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def module_imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """``(imported module, line)`` for every import of the packages' modules in ``path``, at any depth.

    ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module, else of ``pkg``; an import
    of a name that is no module of the packages keeps its dotted name (the test reports it as unresolved).
    """
    is_package = path.name == "__init__.py"
    package = name.split(".") if is_package else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: level 1 is this module's package
                base = package[: len(package) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        else:
            continue
        found += [(t, node.lineno) for t in dict.fromkeys(targets) if t.split(".")[0] in PACKAGES]
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYER_OF:
            return LAYER_OF[".".join(parts[:n])]
    raise KeyError(module)


def import_graph(root: Path, packages=PACKAGES) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Module -> {imported module: first line}, and the imports that name no module of the packages."""
    modules = find_modules(root, packages)
    graph, unresolved = {}, []
    for name, path in modules.items():
        edges: dict[str, int] = {}
        for target, line in module_imports(name, path, modules):
            if target not in modules:
                unresolved.append(f"{path.relative_to(root)}:{line} imports {target}, which is no module")
            elif target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph, unresolved


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def upward_imports(root: Path, graph: dict[str, dict[str, int]], packages=PACKAGES) -> list[str]:
    """``file:line: importer (layer) imports imported (layer)`` for each import its layer may not make."""
    modules = find_modules(root, packages)
    bad = []
    for name, edges in graph.items():
        layer = layer_of(name)
        for target, line in edges.items():
            other = layer_of(target)
            if other != layer and other not in MAY_IMPORT[layer]:
                bad.append(f"{modules[name].relative_to(root)}:{line}: {name} ({layer}) imports {target} ({other})")
    return bad


def test_every_module_has_a_layer():
    assert [m for m in find_modules(REPO) if not _has_layer(m)] == []


def _has_layer(module: str) -> bool:
    try:
        layer_of(module)
    except KeyError:
        return False
    return True


def test_no_import_cycle():
    graph, unresolved = import_graph(REPO)
    assert not unresolved, "\n".join(unresolved)
    found = cycles(graph)
    described = [" <-> ".join(c) + ": " + "; ".join(_edges_within(graph, c)) for c in found]
    assert not described, "import cycles:\n" + "\n".join(described)


def _edges_within(graph, component: list[str]) -> list[str]:
    return [f"{a} -> {b} (line {line})" for a in component for b, line in graph[a].items() if b in component]


def test_no_upward_import():
    graph, _ = import_graph(REPO)
    bad = upward_imports(REPO, graph)
    assert not bad, "imports of a layer above:\n" + "\n".join(bad)


def test_checker_sees_function_level_and_relative_imports(tmp_path):
    # The checker itself, on a package written here: a cycle through a function-level relative import, and an
    # upward import inside a function, must both be found; a package's own __init__ import must not count.
    pkg = tmp_path / "medclip_train"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text("def check():\n    from medclip_train.model import factory\n")
    (pkg / "model" / "__init__.py").write_text("from .factory import build\n")
    (pkg / "model" / "factory.py").write_text("def build():\n    from . import loading\n")
    (pkg / "model" / "loading.py").write_text("from ..model.factory import build\n")
    graph, unresolved = import_graph(tmp_path, packages=("medclip_train",))
    assert unresolved == []
    assert graph["medclip_train.model.factory"] == {"medclip_train.model.loading": 2}
    assert graph["medclip_train.model.loading"] == {"medclip_train.model.factory": 1}
    assert cycles(graph) == [["medclip_train.model.factory", "medclip_train.model.loading"]]
    bad = [line.split(": ", 1)[1] for line in upward_imports(tmp_path, graph, ("medclip_train",))]
    assert bad == ["medclip_train.config (config) imports medclip_train.model.factory (model)"]
