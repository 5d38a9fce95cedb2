"""Issue 16's done-when run: ``medclip-eval suite`` on a project checkpoint and its ``medclip-export`` copy over four
present datasets in the four file layouts (class folders, MedMNIST ``.npz``, CSV of path,label, CLIP_benchmark
webdataset), with every table and plot of the report checked."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from medclip_train.evaluation.bar_charts import task_family
from medclip_train.export import main as export_main
from tests.evaluation.conftest import BREASTMNIST_ENTRY, write_image_folder
from tests.evaluation.test_datasets import write_clip_benchmark_folder
from tests.evaluation.test_suite_cli import BREASTMNIST, checkpoint, run_cli

DATASETS = ("organs", "breastmnist", "lesions", "cb")
CKPT, EXPORT = "demo", "demo_export"


def write_csv_dataset(root: Path, per_class: int = 4) -> Path:
    """``lesions/labels.csv`` (path,label) over ``images/*.jpg``: smooth discs whose brightness depends on the class."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:48, :48]
    rows = ["path,label"]
    for index, label in enumerate(("benign", "malignant")):
        for i in range(per_class):
            cy, cx, r = rng.integers(14, 34), rng.integers(14, 34), rng.integers(6, 14)
            disc = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2.0 * r**2))
            grey = np.clip(40 + (120 + 60 * index) * disc + rng.normal(0, 4, disc.shape), 0, 255).astype(np.uint8)
            name = f"images/{label}_{i}.jpg"
            Image.fromarray(grey, mode="L").save(root / name, quality=90)
            rows.append(f"{name},{label}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, str]:
    """The checkpoint and its copy written by ``medclip-export`` (the code path of the console script)."""
    root = tmp_path_factory.mktemp("models")
    ckpt = checkpoint(root / f"{CKPT}.ckpt", tiny_tokenizer_dir, seed=7)
    with torch.no_grad():  # weights away from the initial ones, as after training, so loading is really exercised
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        gen = torch.Generator().manual_seed(0)
        for name, tensor in state["state_dict"].items():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=gen) * 0.02)
        torch.save(state, ckpt)
    assert export_main(["--checkpoint", str(ckpt), "--output", str(root / EXPORT)]) == 0
    return {CKPT: str(ckpt), EXPORT: f"local-dir:{root / EXPORT}"}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_image_folder(root / "organs", ["brain", "lymph"], per_class=4, seed=3)
    (root / "medmnist").mkdir()
    shutil.copy(BREASTMNIST, root / "medmnist" / "breastmnist.npz")  # the real 20-image test slice
    write_csv_dataset(root / "lesions")
    write_clip_benchmark_folder(root / "cb")  # 2 shards of .webp + .cls, classnames.txt and templates
    return root


@pytest.fixture(scope="module")
def suite(models, data_root, tmp_path_factory) -> dict:
    catalog = tmp_path_factory.mktemp("catalog") / "four.yaml"
    datasets = [
        {"name": "organs", "layout": "imagefolder", "path": "organs", "modality": "mri"},
        BREASTMNIST_ENTRY,
        {
            "name": "lesions",
            "layout": "csv",
            "path": "lesions/labels.csv",
            "classes": ["benign", "malignant"],
            "prompts": str(write_prompts(catalog.parent / "lesions.json")),
            "modality": "dermoscopy",
        },
        {"name": "cb", "layout": "clip_benchmark", "path": "cb", "modality": "photo"},
    ]
    catalog.write_text(yaml.safe_dump({"settings": {"folds": 2, "shots": [1], "knn_k": 3}, "datasets": datasets}))
    out = tmp_path_factory.mktemp("suite")
    args = ["suite", "--models", *models.values(), "--catalog", catalog, "--data-root", data_root, "--output", out]
    code, printed = run_cli([*args, "--device", "cpu", "--no-progress", "--bootstrap", "50"])
    assert code == 0
    return {"out": out, "printed": printed, "json": json.loads((out / "results.json").read_text())}


def write_prompts(path: Path) -> Path:
    prompts = {"classnames": {"benign": "a benign lesion", "malignant": "a melanoma"}, "templates": ["{c}", "a {c}."]}
    path.write_text(json.dumps(prompts))
    return path


def test_every_dataset_of_the_four_layouts_is_evaluated_for_both_models(suite):
    data = suite["json"]
    assert data["skipped"] == []
    assert list(data["models"]) == [CKPT, EXPORT]
    sizes = {"organs": 8, "breastmnist": 20, "lesions": 8, "cb": 9}
    for label in (CKPT, EXPORT):
        assert list(data["results"][label]) == list(DATASETS)
        for dataset, result in data["results"][label].items():
            assert result["n"] == sizes[dataset] and result["zeroshot"]["n"] == sizes[dataset], (label, dataset)
            for task in ("zeroshot", "probe_cv", "few_shot", "feature_map", "overlay"):
                assert task in result, (label, dataset, task)
            assert "probes" in result["probe_cv"] and "probe_note" not in result


def _same_figures(ours, theirs, where: str = "") -> None:
    """Equal structure; every number equal to 1e-6 (features agree to ~1e-7); plot paths differ by the label."""
    if isinstance(ours, dict):
        assert set(ours) == set(theirs), where
        for key in ours:
            if key != "plots":
                _same_figures(ours[key], theirs[key], f"{where}.{key}")
    elif isinstance(ours, list):
        assert len(ours) == len(theirs), where
        for i, (a, b) in enumerate(zip(ours, theirs)):
            _same_figures(a, b, f"{where}[{i}]")
    elif isinstance(ours, float) and isinstance(theirs, float):
        assert theirs == pytest.approx(ours, abs=1e-6), where
    else:
        assert ours == theirs, where


def test_the_exported_copy_scores_exactly_like_the_checkpoint(suite, models, data_root):
    results = suite["json"]["results"]
    _same_figures(results[CKPT], results[EXPORT], "results")
    # The accuracy-like figures are counts over the images: not merely close, identical.
    for dataset in DATASETS:
        for metric in ("top1", "balanced_acc", "macro_f1"):
            assert results[CKPT][dataset]["zeroshot"][metric] == results[EXPORT][dataset]["zeroshot"][metric]
    # The features themselves, loaded the way the suite loads both models.
    from medclip_train.evaluation.model_source import load_for_eval

    files = sorted((data_root / "organs").glob("*/*.png"))
    features = []
    for spec in models.values():
        loaded = load_for_eval(spec, None, "cpu", False)
        batch = torch.stack([loaded.preprocess(Image.open(f).convert("RGB")) for f in files])
        with torch.no_grad():
            features.append(loaded.model.eval().encode_image(batch, normalize=True))
    assert torch.allclose(features[0], features[1], atol=1e-6, rtol=0)


def markdown_tables(report: str) -> dict[str, list[list[str]]]:
    """``## heading`` -> the rows (cells) of the table under it."""
    tables, heading = {}, None
    for line in report.splitlines():
        if line.startswith("## "):
            heading = line[3:].strip()
        elif line.startswith("|") and heading is not None and not set(line) <= set("|-: "):
            tables.setdefault(heading, []).append([c.strip() for c in line.strip("|").split("|")])
    return tables


def test_the_report_has_one_table_per_task_with_a_row_per_dataset(suite):
    report = (suite["out"] / "report.md").read_text()
    tables = markdown_tables(report)
    with (suite["out"] / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    families = list(dict.fromkeys(task_family(r["task"]) for r in rows))
    wanted = {"zero-shot", "logreg", "linear_svm", "knn", "feature map", "few-shot 1/class"}
    assert wanted | {"text overlay: other class", 'text overlay: neutral "scan 2019"'} <= set(families)
    assert list(tables) == families
    for family, table in tables.items():
        header, *body = table
        assert header == ["dataset", "task", "metric", "chance", CKPT, EXPORT], family
        assert {r[0] for r in body} == set(DATASETS), family
        csv_rows = [r for r in rows if task_family(r["task"]) == family]
        assert len(body) == len(csv_rows), family
        for cells, row in zip(body, csv_rows):
            assert cells[:3] == [row["dataset"], row["task"], row["metric"]]
            # Equal figures: both models' cells read the same, and both are bold (best) where a best is marked.
            assert cells[4] == cells[5], (family, cells)
    zeroshot = {(r[0], r[2]): r for r in tables["zero-shot"][1:]}
    assert set(zeroshot) == {(d, m) for d in DATASETS for m in ("top1", "balanced_acc", "macro_f1", "auroc")}
    assert zeroshot[("organs", "top1")][4].startswith("**")
    assert json.loads((suite["out"] / "results.json").read_text())["results"]


def _png_links(report: str) -> list[str]:
    return re.findall(r"\]\((plots/[^)]+\.png)\)", report)


def test_every_png_the_report_names_is_a_real_image(suite):
    report = (suite["out"] / "report.md").read_text()
    links = _png_links(report)
    charts = suite["json"]["bar_charts"]  # task family -> PNG, one per table
    assert set(charts) == set(markdown_tables(report))
    maps = {f"plots/map_{m}_{d}_tsne.png" for m in (CKPT, EXPORT) for d in DATASETS}
    maps |= {f"plots/map_{m}_modality_tsne.png" for m in (CKPT, EXPORT)}
    assert set(links) == maps | set(charts.values())
    for link in links:
        path = suite["out"] / link
        assert path.stat().st_size > 8_000, link
        with Image.open(path) as image:
            image.verify()  # the whole file, CRCs included
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) >= 200, link
            grey = np.asarray(image.convert("L"), dtype=np.float32)
            # A chart has axes, bars and text: many distinct shades, not a blank canvas.
            assert grey.std() > 5 and len(np.unique(grey)) > 20, link
    assert suite["printed"].count("## zero-shot") == 1
