"""Bar charts: one PNG per task family, with a panel per metric."""

from __future__ import annotations

import numpy as np
from PIL import Image

from medclip_train.evaluation.bar_charts import save_task_charts, task_family


def test_per_dataset_details_are_not_separate_tasks():
    assert task_family("knn (5-fold) k=20") == task_family("knn (3-fold) k=3") == "knn"
    assert task_family("feature map (cosine, k=10)") == "feature map"
    assert task_family("few-shot 4/class") == "few-shot 4/class"
    assert task_family('text overlay: neutral "scan 2019"') == 'text overlay: neutral "scan 2019"'


def test_one_png_per_task_with_missing_cells_and_chance(tmp_path):
    def row(dataset, task, metric, chance, a, b):
        return {"dataset": dataset, "task": task, "metric": metric, "chance": chance, "cells": {"m1": a, "m2": b}}

    rows = [
        row("bm", "zero-shot", "top1", 0.65, {"value": 0.35, "ci95": [0.15, 0.55]}, {"value": 0.7, "ci95": None}),
        row("organs", "zero-shot", "top1", 0.5, {"value": 0.9, "ci95": [0.8, 1.0]}, None),
        row("bm", "knn (3-fold) k=3", "accuracy", 0.65, {"mean": 0.5, "std": 0.1}, {"mean": None, "std": None}),
        row("organs", "knn (2-fold) k=2", "accuracy", 0.5, {"mean": 0.6, "std": 0.0}, {"mean": 0.4, "std": 0.2}),
        row("bm", "text overlay: other class", "cosine_shift", None, {"value": 0.01}, {"value": 0.2}),
    ]
    charts = save_task_charts(rows, ["m1", "m2"], tmp_path)
    assert [(f, p.name) for f, p in charts] == [
        ("zero-shot", "bars_zero-shot.png"),
        ("knn", "bars_knn.png"),
        ("text overlay: other class", "bars_text_overlay_other_class.png"),
    ]
    for _, path in charts:
        with Image.open(path) as image:
            assert image.format == "PNG" and 200 <= image.height <= 2000 and 300 <= image.width <= 3000
            colours = np.asarray(image.convert("RGB")).reshape(-1, 3)
        tab10_blue = np.array([31, 119, 180])  # the first model's bars
        assert (np.abs(colours.astype(int) - tab10_blue).sum(1) < 10).sum() > 100


def test_dataset_names_under_the_bars_do_not_run_into_each_other():
    """Three datasets with names of 11-13 characters and two models (the demo's suite): the names under each panel
    overlapped until they were slanted when too long for their group's width."""
    import matplotlib.pyplot as plt

    from medclip_train.evaluation.bar_charts import draw_task_chart

    names = ["demo_nodule", "demo_modality", "breastmnist"]
    rows = [
        {
            "dataset": d,
            "task": "zero-shot",
            "metric": m,
            "chance": 0.5,
            "cells": {"a": {"value": 0.7}, "b": {"value": 0.6}},
        }
        for d in names
        for m in ("top1", "auroc")
    ]
    fig = draw_task_chart("zero-shot", rows, ["a", "b"])
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        boxes = [label.get_window_extent(renderer) for label in ax.get_xticklabels() if label.get_text()]
        assert len(boxes) == 3
        for left, right in zip(boxes, boxes[1:]):
            assert not left.overlaps(right), f"{ax.get_title()}: tick labels overlap"
    plt.close(fig)
