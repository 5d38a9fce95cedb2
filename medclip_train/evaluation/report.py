"""Results on disk and on screen: JSON, CSV (long format), per-class CSV, confusion-matrix PNG, markdown tables."""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def to_jsonable(value):
    """Tensors and arrays to lists, NaN to ``None`` (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(data), indent=2) + "\n")
    return path


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    """Rows of dicts; the columns are the union of their keys in first-seen order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows([{k: to_jsonable(v) for k, v in row.items()} for row in rows])
    return path


def long_rows(
    metrics: dict[str, float], intervals: dict | None = None, chance: dict | None = None, **fixed
) -> list[dict]:
    """``{"top1": 0.5}`` -> ``[{**fixed, "metric": "top1", "value": 0.5}]`` for the results CSV.

    With ``intervals`` (``{"top1": [low, high]}``) and ``chance`` (``{"top1": 0.25}``), every row also gets
    ``ci_low``, ``ci_high`` and ``chance`` (empty where a metric has none). Nested values (tables) are left out.
    """
    rows = []
    for key, value in metrics.items():
        if isinstance(value, (dict, list)):
            continue
        row = {**fixed, "metric": key, "value": value}
        if intervals is not None or chance is not None:
            low, high = (intervals or {}).get(key) or (None, None)
            row.update(ci_low=low, ci_high=high, chance=(chance or {}).get(key))
        rows.append(row)
    return rows


def format_interval(interval) -> str:
    """``[low, high]`` as ``[0.1234, 0.5678]``; ``-`` when there is none."""
    if not interval or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in interval):
        return "-"
    return f"[{format_value(float(interval[0]))}, {format_value(float(interval[1]))}]"


def save_confusion_matrix(path: str | Path, matrix, classnames: list[str], title: str = "") -> Path:
    """Counts with rows = true class, columns = predicted class, as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: evaluation runs on servers and in training workers
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    matrix = np.asarray(matrix)
    size = max(5.0, 0.6 * len(classnames) + 3)  # long medical class names need room on both axes
    fig, ax = plt.subplots(figsize=(size, size))
    display = ConfusionMatrixDisplay(matrix, display_labels=classnames)
    display.plot(ax=ax, colorbar=False, xticks_rotation="vertical", include_values=len(classnames) <= 20)
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def write_classification_details(out_dir: str | Path, stem: str, result: dict) -> list[Path]:
    """``{stem}_per_class.csv`` and, for single-label results, ``{stem}_confusion.png``."""
    out_dir = Path(out_dir)
    paths = [write_csv(out_dir / f"{stem}_per_class.csv", result["per_class"])]
    if "confusion_matrix" in result:
        names = [row["class"] for row in result["per_class"]]
        paths.append(save_confusion_matrix(out_dir / f"{stem}_confusion.png", result["confusion_matrix"], names, stem))
    return paths


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "task"


def format_value(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str], cell: Callable[[object], str] = format_value) -> str:
    """A markdown table of ``rows`` (dicts keyed by column); ``cell`` formats a value (default: missing as ``-``)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] * len(columns)) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)
