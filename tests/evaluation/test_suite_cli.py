"""``medclip-eval suite``: two real tiny checkpoints over a tiny catalog (real BreastMNIST slice, a class-folder set,
one absent set), checked against ``medclip-eval zeroshot`` and an independent scikit-learn cross-validation."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.svm import LinearSVC

from data_prep.medmnist import LABELS
from medclip_train.data.class_folders import slug
from medclip_train.evaluation import cli
from medclip_train.evaluation.catalog import load_catalog
from medclip_train.evaluation.prompts import load_prompt_set
from tests.evaluation.conftest import BREASTMNIST_ENTRY, write_image_folder

BREASTMNIST = Path(__file__).resolve().parents[1] / "fixtures" / "realdata" / "medmnist" / "breastmnist.npz"
ORGAN_PROMPTS = {
    "name": "organs",
    "classnames": {"brain": "an MRI of the brain", "lymph": "lymph node tissue"},
    "templates": ["{c}", "a photo of {c}."],
}
FOLDS, SHOTS, KNN_K = 3, [1, 4, 8], 3
ZEROSHOT_KEYS = ("top1", "balanced_acc", "macro_f1", "auroc", "chance", "ci95")


def run_cli(args: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main([str(a) for a in args])
    return code, out.getvalue()


def checkpoint(path: Path, tokenizer_dir: Path, seed: int) -> Path:
    """A project checkpoint of the tiny preset; two seeds give two models that score differently."""
    from medclip_train.config import ModelConfig
    from medclip_train.module import CLIPModule

    L.seed_everything(seed)
    module = CLIPModule(ModelConfig(preset="tiny", tokenizer=str(tokenizer_dir)))
    trainer = L.Trainer(accelerator="cpu", max_steps=0, logger=False, enable_checkpointing=False)
    trainer.strategy.connect(module)
    trainer.strategy._lightning_module = module
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer_dir) -> list[Path]:
    root = tmp_path_factory.mktemp("models")
    return [checkpoint(root / f"model_{s}.ckpt", tiny_tokenizer_dir, s) for s in (1, 2)]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """``medmnist/breastmnist.npz`` (the real 20-image test slice) and ``organs/<class>/`` (2 x 6 PNGs)."""
    root = tmp_path_factory.mktemp("data")
    (root / "medmnist").mkdir()
    shutil.copy(BREASTMNIST, root / "medmnist" / "breastmnist.npz")
    write_image_folder(root / "organs", ["brain", "lymph"], per_class=6, seed=3, prompts=ORGAN_PROMPTS)
    return root


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    data = {
        "settings": {"folds": FOLDS, "shots": SHOTS, "knn_k": KNN_K, "seed": 0},
        "datasets": [
            BREASTMNIST_ENTRY,
            {"name": "organs", "layout": "imagefolder", "path": "organs", "modality": "histology"},
            {"name": "pcam", "layout": "clip_benchmark", "path": "wds_pcam", "prompts": "pcam"},
        ],
    }
    path = tmp_path_factory.mktemp("catalog") / "tiny.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def suite(models, data_root, catalog, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("suite")
    args = ["suite", "--models", *models, "--catalog", catalog, "--data-root", data_root, "--output", out]
    code, printed = run_cli([*args, "--device", "cpu", "--no-progress"])
    assert code == 0
    return {"out": out, "printed": printed, "json": json.loads((out / "results.json").read_text())}


def zeroshot_cli(model: Path, folder: Path, out: Path, *extra) -> dict:
    code, _ = run_cli(["zeroshot", "--model", model, "--data", folder, "--output", out, "--device", "cpu", *extra])
    assert code == 0
    return json.loads((out / "zeroshot.json").read_text())["tasks"][folder.name]


def test_an_absent_dataset_is_listed_as_skipped_with_the_path_looked_for(suite, data_root):
    assert suite["json"]["skipped"] == [{"dataset": "pcam", "path": str(data_root / "wds_pcam"), "reason": "not found"}]
    assert f"- pcam: not found: {data_root / 'wds_pcam'}" in (suite["out"] / "report.md").read_text()
    assert set(suite["json"]["results"]["model_1"]) == {"breastmnist", "organs"}


def test_zeroshot_figures_equal_medclip_eval_zeroshot(suite, models, data_root, tmp_path):
    for model in models:
        ours = suite["json"]["results"][model.stem]
        theirs = zeroshot_cli(model, data_root / "organs", tmp_path / f"organs_{model.stem}")
        assert {k: ours["organs"]["zeroshot"][k] for k in ZEROSHOT_KEYS} == {k: theirs[k] for k in ZEROSHOT_KEYS}
        # The .npz read by the suite against the same pixels written as PNG class folders (lossless).
        folder = tmp_path / "breastmnist"
        with np.load(BREASTMNIST) as arrays:
            for i, (pixels, label) in enumerate(zip(arrays["test_images"], arrays["test_labels"])):
                (folder / ["malignant", "normal_benign"][int(label)]).mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(folder / ["malignant", "normal_benign"][int(label)] / f"{i:03d}.png")
        theirs = zeroshot_cli(model, folder, tmp_path / f"bm_{model.stem}", "--prompts", "medmnist_breastmnist")
        assert ours["breastmnist"]["zeroshot"]["n"] == theirs["n"] == 20
        # Bootstrap draws depend on the sample order (npz index vs class folders), so the intervals are compared on
        # the organs set above only; every point figure must agree here too.
        point = [k for k in ZEROSHOT_KEYS if k != "ci95"]
        assert {k: ours["breastmnist"]["zeroshot"][k] for k in point} == {k: theirs[k] for k in point}


def test_cross_validated_probes_equal_scikit_learns_cross_val_score(suite, models, data_root):
    from medclip_train.model.loading import load_model

    loaded = load_model(str(models[0]), device="cpu")
    files = sorted((data_root / "organs").glob("*/*.png"))  # class folders brain < lymph, files sorted in each
    labels = np.array([0 if f.parent.name == "brain" else 1 for f in files])
    batch = torch.stack([loaded.preprocess(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        features = loaded.model.eval().encode_image(batch, normalize=True).float().numpy()
    cv = StratifiedKFold(n_splits=FOLDS, shuffle=True, random_state=0)
    estimators = {
        "logreg": LogisticRegression(max_iter=1000, random_state=0),
        "linear_svm": LinearSVC(max_iter=1000, random_state=0),
        "knn": KNeighborsClassifier(n_neighbors=KNN_K, metric="cosine"),
    }
    probes = suite["json"]["results"]["model_1"]["organs"]["probe_cv"]
    assert probes["n_folds"] == FOLDS and probes["n"] == 12
    for name, estimator in estimators.items():
        for ours_key, scoring in (("accuracy", "accuracy"), ("macro_f1", "f1_macro")):
            scores = cross_val_score(estimator, features, labels, cv=cv, scoring=scoring)
            ours = probes["probes"][name][ours_key]
            assert ours["folds"] == pytest.approx(scores.tolist(), abs=1e-12), (name, ours_key)
            assert (ours["mean"], ours["std"]) == pytest.approx((scores.mean(), scores.std()), abs=1e-12)


def test_the_table_has_a_column_per_model_and_a_row_per_dataset_task_metric(suite):
    report = (suite["out"] / "report.md").read_text()
    assert report.splitlines()[:3] == ["## zero-shot", "", "| dataset | task | metric | chance | model_1 | model_2 |"]
    assert report.splitlines()[2] in suite["printed"]
    with (suite["out"] / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:6] == ["dataset", "task", "metric", "chance", "model_1", "model_2"]
    tasks = {(r["dataset"], r["task"]) for r in rows}
    assert ("organs", "zero-shot") in tasks and ("breastmnist", f"logreg ({FOLDS}-fold)") in tasks
    assert ("organs", "few-shot 4/class") in tasks and ("breastmnist", f"knn ({FOLDS}-fold) k={KNN_K}") in tasks
    # organs: 6 images per class, 4 per class in a training fold: 8 per class cannot be drawn, and says so.
    assert "organs / model_1: few-shot 8/class skipped: a class has 4 < 8 training samples in fold 0" in report
    top1 = next(r for r in rows if r["dataset"] == "breastmnist" and r["task"] == "zero-shot" and r["metric"] == "top1")
    assert float(top1["chance"]) == pytest.approx(13 / 20)  # the majority class's share of the real slice


def test_features_are_encoded_once_per_model_and_dataset(suite):
    assert len(list((suite["out"] / "feature_cache").glob("images-*.pt"))) == 2 * 2


def test_shipped_catalog_parses_and_its_prompt_sets_match_its_classes():
    catalog = load_catalog("medical")
    names = {e.name for e in catalog.datasets}
    wanted = {"pneumoniamnist", "breastmnist", "retinamnist", "bloodmnist", "dermamnist", "brain_tumor_mri", "busi"}
    assert wanted | {"lc25000_lung", "lc25000_colon", "isic2019", "pcam"} <= names
    for entry in catalog.datasets:
        prompts = load_prompt_set(entry.prompts, entry.classes)  # raises when keys and classes differ
        if entry.classes:
            assert prompts.classes == entry.classes
        if entry.layout == "medmnist_npz":  # label-index order, from the converter's official names
            assert entry.classes == [slug(n) for n in LABELS[Path(entry.path).stem]], entry.name


def test_a_bad_catalog_field_is_one_line_naming_it(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"datasets": [{"name": "x", "layout": "zip", "path": "x.zip"}]}))
    code, _ = run_cli(["suite", "--models", "m", "--catalog", path, "--data-root", tmp_path, "--output", tmp_path])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"--catalog {path}: datasets[0] (x).layout: 'zip' is not one of" in err


def test_csv_layout_and_excluded_mask_files(tmp_path):
    root = write_image_folder(tmp_path / "busi", ["benign", "normal"], per_class=3)
    for image in list(root.glob("*/*.png")):
        shutil.copy(image, image.with_name(image.stem + "_mask.png"))  # BUSI keeps masks beside the images
    rows = ["path,label"] + [f"busi/{p.parent.name}/{p.name},{p.parent.name}" for p in sorted(root.glob("*/*_?.png"))]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    data = yaml.safe_dump(
        {
            "datasets": [
                {"name": "folders", "layout": "imagefolder", "path": "busi", "exclude": ["*_mask*"]},
                {
                    "name": "table",
                    "layout": "csv",
                    "path": "labels.csv",
                    "classes": ["benign", "normal"],
                    "tasks": ["probe_cv"],
                },
                {"name": "bad", "layout": "csv", "path": "labels.csv", "classes": ["benign"], "tasks": ["probe_cv"]},
            ]
        }
    )
    (tmp_path / "c.yaml").write_text(data)
    folders, table, bad = load_catalog(tmp_path / "c.yaml").datasets
    opened = folders.open(tmp_path)
    assert len(opened.source) == 6 and not any("mask" in f.name for f, _ in opened.source.samples)
    table_source = table.open(tmp_path).source
    assert [(p.name, c) for p, c in table_source.samples] == [(f.name, c) for f, c in opened.source.samples]
    with pytest.raises(Exception, match=r"labels.csv:5: label 'normal' is not one of the classes \['benign'\]"):
        bad.open(tmp_path)


def organ_features(model: Path, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The organs images encoded here, outside the suite: class folders brain < lymph, files sorted in each."""
    from medclip_train.model.loading import load_model

    loaded = load_model(str(model), device="cpu")
    files = sorted(folder.glob("*/*.png"))
    labels = np.array([0 if f.parent.name == "brain" else 1 for f in files])
    batch = torch.stack([loaded.preprocess(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        return loaded.model.eval().encode_image(batch, normalize=True).float().numpy(), labels


def test_feature_maps_silhouette_and_purity_in_every_output(suite, models, data_root):
    from sklearn.metrics import silhouette_score

    features, labels = organ_features(models[0], data_root / "organs")
    fm = suite["json"]["results"]["model_1"]["organs"]["feature_map"]
    assert fm["silhouette"] == pytest.approx(silhouette_score(features, labels, metric="cosine"), abs=1e-6)
    # 6 + 6 images: k lowered to 5, so that separated classes can score 1; chance 0.5^2 + 0.5^2.
    assert fm["knn_purity_k"] == 5 and fm["chance"]["knn_purity"] == pytest.approx(0.5)
    with (suite["out"] / "results.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["task"].startswith("feature map")]
    assert {(r["dataset"], r["metric"]) for r in rows} == {
        (d, m) for d in ("breastmnist", "organs") for m in ("silhouette", "knn_purity")
    }
    report = (suite["out"] / "report.md").read_text()
    assert "| organs | feature map (cosine, k=5) | knn_purity | 0.5000 |" in report
    maps = [f"plots/map_{m}_{d}_tsne.png" for m in ("model_1", "model_2") for d in ("breastmnist", "organs")]
    for link in maps:
        assert f"({link})" in report
        with Image.open(suite["out"] / link) as image:
            assert image.format == "PNG" and min(image.size) >= 300


def test_a_map_over_all_datasets_is_coloured_by_modality(suite):
    assert suite["json"]["modality_maps"]["model_1"] == ["plots/map_model_1_modality_tsne.png"]
    with Image.open(suite["out"] / "plots/map_model_1_modality_tsne.png") as image:
        assert image.format == "PNG"


def test_text_overlay_figures_equal_zeroshot_and_encoding_of_burnt_copies(suite, models, data_root, tmp_path):
    from medclip_train.evaluation.overlay import NEUTRAL_TEXT, burn_text

    names = ORGAN_PROMPTS["classnames"]  # what the prompts write; the other class of brain is lymph and back
    other = {"brain": names["lymph"], "lymph": names["brain"]}
    ours = suite["json"]["results"]["model_1"]["organs"]["overlay"]
    clean, _ = organ_features(models[0], data_root / "organs")
    for variant, text_of in (("other_class", other), ("neutral", {"brain": NEUTRAL_TEXT, "lymph": NEUTRAL_TEXT})):
        folder = tmp_path / f"organs_{variant}"
        for f in sorted((data_root / "organs").glob("*/*.png")):
            (folder / f.parent.name).mkdir(parents=True, exist_ok=True)
            burn_text(Image.open(f), text_of[f.parent.name]).save(folder / f.parent.name / f.name)
        shutil.copy(data_root / "organs" / "prompts.json", folder)
        theirs = zeroshot_cli(models[0], folder, tmp_path / f"zs_{variant}")
        assert ours[variant]["top1"] == theirs["top1"]
        burnt, _ = organ_features(models[0], folder)
        shift = float((1 - (clean * burnt).sum(1)).mean())
        assert ours[variant]["cosine_shift"] == pytest.approx(shift, abs=1e-6)
    with (suite["out"] / "results.csv").open() as f:
        rows = {(r["dataset"], r["task"], r["metric"]) for r in csv.DictReader(f)}
    for metric in ("top1_clean", "top1", "top1_drop", "cosine_shift", "flipped", "flipped_to_written"):
        assert ("breastmnist", "text overlay: other class", metric) in rows
    assert ("organs", 'text overlay: neutral "scan 2019"', "cosine_shift") in rows
    assert ("organs", 'text overlay: neutral "scan 2019"', "flipped_to_written") not in rows
    assert ours["other_class"]["top1_clean"] == suite["json"]["results"]["model_1"]["organs"]["zeroshot"]["top1"]


def test_a_bar_chart_per_task_linked_from_the_report(suite):
    report = (suite["out"] / "report.md").read_text()
    charts = suite["json"]["bar_charts"]
    families = {"zero-shot", "logreg", "linear_svm", "knn", "feature map", "text overlay: other class"}
    assert families | {f"few-shot {k}/class" for k in SHOTS} <= set(charts)
    for family, link in charts.items():
        assert f"![{family}]({link})" in report and link.startswith("plots/bars_")
        with Image.open(suite["out"] / link) as image:
            assert image.format == "PNG" and min(image.size) >= 200


def test_model_columns_are_named_after_the_run_for_last_ckpt():
    """Every run writes last.ckpt: two runs' last checkpoints are told apart by their run folders, not as last#2."""
    from medclip_train.evaluation.suite_cli import model_labels

    specs = ["runs/demo/last.ckpt", "runs/breast/last.ckpt", "runs/demo/step0000300.ckpt", "local-dir:exp/demo/"]
    assert model_labels(specs) == ["demo", "breast", "step0000300", "demo#2"]
