"""Bar charts of ``medclip-eval suite``: one PNG per task, datasets on the x axis, a bar per model, chance dashed.

Each task's metrics get a panel each; a bar carries its spread where there is one (the 95% bootstrap interval of
zero-shot, the std over folds of the probes).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from medclip_train.evaluation.report import safe_name


def task_family(task: str) -> str:
    """The task without per-dataset details (folds, k lowered for a small set): ``knn (3-fold) k=3`` -> ``knn``."""
    return re.sub(r"\s*\([^)]*\)|\s+k=\d+", "", task).strip()


def _value_and_error(cell: dict | None) -> tuple[float, tuple[float, float]]:
    """Bar height and (below, above) error bar lengths; NaN where the figure was not computed."""
    if not cell:
        return math.nan, (0.0, 0.0)
    if "mean" in cell:
        value = cell.get("mean")
        value = math.nan if value is None else value
        return value, (cell.get("std") or 0.0, cell.get("std") or 0.0)
    value = cell.get("value")
    value = math.nan if value is None else float(value)
    interval = cell.get("ci95")
    if interval and None not in interval and not math.isnan(value):
        return value, (max(0.0, value - interval[0]), max(0.0, interval[1] - value))
    return value, (0.0, 0.0)


def save_task_charts(rows: list[dict], labels: list[str], plots: Path) -> list[tuple[str, Path]]:
    """One figure per task family of ``rows`` (the suite's comparison rows); returns ``(family, path)`` in order."""
    families: dict[str, list[dict]] = {}
    for row in rows:
        families.setdefault(task_family(row["task"]), []).append(row)
    return [(family, save_task_chart(family, family_rows, labels, plots)) for family, family_rows in families.items()]


def save_task_chart(family: str, rows: list[dict], labels: list[str], plots: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = draw_task_chart(family, rows, labels)
    path = plots / f"bars_{safe_name(family)}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


DPI = 100


def draw_task_chart(family: str, rows: list[dict], labels: list[str]):
    """The figure of one task family: a panel per metric, a group of bars (one per model) per dataset."""
    import matplotlib

    matplotlib.use("Agg")  # headless: evaluation runs on servers
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    columns = min(3, len(metrics))
    lines = math.ceil(len(metrics) / columns)
    # A panel wide enough for its dataset names side by side (about 8 px a character at this size and DPI) when
    # they are not slanted: the demo's names ran into each other.
    names = 0.0 if len(datasets) > 3 else len(datasets) * (max(map(len, datasets)) * 8 / DPI + 0.3) + 0.9
    width = max(3.2, 0.9 + 0.45 * len(datasets) * max(2, len(labels)), names)
    figsize = (max(6.5, width * columns), 3.4 * lines + 0.6)
    fig, axes = plt.subplots(lines, columns, figsize=figsize, squeeze=False)
    colours = plt.get_cmap("tab10")
    bar = 0.8 / len(labels)
    x = np.arange(len(datasets))
    for ax, metric in zip(axes.flat, metrics):
        by_dataset = {r["dataset"]: r for r in rows if r["metric"] == metric}
        for m, label in enumerate(labels):
            values, errors = zip(
                *(_value_and_error(by_dataset.get(d, {}).get("cells", {}).get(label)) for d in datasets)
            )
            offset = x - 0.4 + bar * (m + 0.5)
            spread = np.array(errors).T if np.any(errors) else None  # no caps drawn on figures without a spread
            bars = ax.bar(offset, values, bar, yerr=spread, capsize=2, color=colours(m % 10), label=label)
            if len(datasets) * len(labels) <= 24:  # a value printed on each bar: a 0 and a missing figure differ
                ax.bar_label(bars, ["" if math.isnan(v) else f"{v:.2f}" for v in values], fontsize=7, padding=1)
                for position, value in zip(offset, values):
                    if math.isnan(value):  # matplotlib draws nothing for NaN: say it was not computed
                        ax.text(position, 0, "n/a", ha="center", va="bottom", fontsize=7, color="grey")
        for i, d in enumerate(datasets):
            chance = (by_dataset.get(d) or {}).get("chance")
            if chance is not None and not (isinstance(chance, float) and math.isnan(chance)):
                ax.hlines(chance, i - 0.45, i + 0.45, colors="black", linestyles="dashed", linewidth=1)
        ax.set_title(metric, fontsize=10)
        slant = len(datasets) > 3
        ax.set_xticks(x, datasets, rotation=30 if slant else 0, ha="right" if slant else "center")
        ax.axhline(0, color="grey", linewidth=0.5)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.set_visible(False)
    handles, names = axes.flat[0].get_legend_handles_labels()
    handles.append(plt.Line2D([], [], color="black", linestyle="dashed", linewidth=1))
    names.append("chance")
    fig.legend(handles, names, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(f"{family}\n(a bar per model; error bars: 95% CI or std over folds)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    return fig
