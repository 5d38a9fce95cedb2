"""One entry point for the benchmarks: ``python -m bench <name> [options]``.

Each benchmark is a module ``bench/<name>.py`` with ``main(argv: list[str]) -> None`` that writes JSON to
``bench/results/`` and prints a markdown table (copied into BENCHMARKS.md with machine, date and command).
"""

import importlib
import pkgutil
import sys
from pathlib import Path


def _available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if not m.name.startswith("_"))


def main() -> None:
    names = _available()
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(f"usage: python -m bench <name> [options]\n  benchmarks: {', '.join(names)}")
        raise SystemExit(0 if len(sys.argv) >= 2 else 2)
    name = sys.argv[1]
    if name not in names:
        raise SystemExit(f"unknown benchmark {name!r}; available: {', '.join(names)}")
    importlib.import_module(f"bench.{name}").main(sys.argv[2:])


if __name__ == "__main__":
    main()
