"""MedMNIST: the real BreastMNIST slice, label-name table, multi-label ChestMNIST, zero-shot export."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_prep.medmnist import LABELS, label_names
from tests.data_prep.readback import check_accounting


def test_breastmnist_slice(realdata, tmp_path, run_cli):
    npz = realdata / "medmnist" / "breastmnist.npz"
    out = tmp_path / "out"
    code, stdout, _ = run_cli("medmnist", npz, "-o", out)
    assert code == 0
    manifest, samples, rejected = check_accounting(out, stdout)
    assert manifest["counts"] == {"read": 70, "written": 70, "rejected": 0}
    data = np.load(npz)
    test_labels = data["test_labels"].reshape(-1)
    by_id = {s["json"]["id"]: s for s in samples}
    first = by_id["breastmnist_test_0"]
    expected = ["malignant", "normal, benign"][int(test_labels[0])]
    assert first["json"]["labels"] == [f"breastmnist:{expected}"]
    assert first["json"]["modality"] == "ultrasound" and first["json"]["licence"] == "CC BY 4.0"
    assert "breast ultrasound" in first["txt"].lower() and first["image_ext"] == "png"
    train_counts = np.bincount(data["train_labels"].reshape(-1), minlength=2)
    assert manifest["label_counts"]["train"] == {
        "breastmnist:normal, benign": int(train_counts[1]),
        "breastmnist:malignant": int(train_counts[0]),
    }
    # Zero-shot export of the test split, one folder per class slug, with prompts.json.
    task = out / "zeroshot" / "breastmnist"
    prompts = json.loads((task / "prompts.json").read_text())
    assert prompts["classnames"] == {"malignant": "malignant", "normal_benign": "normal or benign tissue"}
    assert all("{c}" in t for t in prompts["templates"])
    assert len(list((task / "malignant").glob("*.png"))) == int((test_labels == 0).sum())
    assert len(list((task / "normal_benign").glob("*.png"))) == int((test_labels == 1).sum())
    assert manifest["extras"]["zeroshot"]["breastmnist"]["images"] == 20


def test_label_table_covers_all_2d_subsets():
    assert set(LABELS) == {
        "pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist", "retinamnist", "breastmnist",
        "bloodmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist",
    }  # fmt: skip
    assert LABELS["breastmnist"] == ("malignant", "normal, benign")
    assert len(LABELS["chestmnist"]) == 14 and len(LABELS["pathmnist"]) == 9 and len(LABELS["organamnist"]) == 11
    assert label_names("breastmnist", np.array([1])) == ["normal, benign"]
    with pytest.raises(ValueError):
        label_names("breastmnist", np.array([2]))


def test_multilabel_chestmnist_and_bad_labels(tmp_path, run_cli):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 2), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        labels = np.zeros((n, 14), np.uint8)
        labels[0, [2, 5]] = 1  # effusion and nodule
        if n > 2:
            labels[2, 0] = 1  # atelectasis only
        arrays[f"{split}_labels"] = labels
    arrays["train_labels"] = arrays["train_labels"][:, :13]  # wrong width in train: every train row rejected
    np.savez(tmp_path / "chestmnist_64.npz", **arrays)
    code, out, _ = run_cli("medmnist", tmp_path / "chestmnist_64.npz", "-o", tmp_path / "out")
    assert code == 0
    manifest, samples, rejected = check_accounting(tmp_path / "out", out)
    assert len(rejected) == 6 and {r["reason"] for r in rejected} == {"malformed_record"}
    by_id = {s["json"]["id"]: s for s in samples}
    assert by_id["chestmnist_test_0"]["json"]["labels"] == ["chestmnist:effusion", "chestmnist:nodule"]
    assert "effusion and nodule" in by_id["chestmnist_test_0"]["txt"].lower()
    assert by_id["chestmnist_test_1"]["json"]["labels"] == [] and "no finding" in by_id["chestmnist_test_1"]["txt"]
    # Only single-label test images go to the zero-shot folder.
    task = tmp_path / "out" / "zeroshot" / "chestmnist"
    assert sorted(p.name for p in task.iterdir() if p.is_dir()) == ["atelectasis"]
    assert "note" in json.loads((task / "prompts.json").read_text())


def test_unknown_subset_is_a_clear_error(tmp_path, run_cli):
    np.savez(tmp_path / "mystery.npz", x=np.zeros(1))
    code, _, err = run_cli("medmnist", tmp_path / "mystery.npz", "-o", tmp_path / "out")
    assert code == 2 and "mystery" in err and "--subset" in err
