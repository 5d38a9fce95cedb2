"""Shipped prompt sets load on what the shipped converters write: the class folders of ``medclip-prep medmnist``'s
zero-shot export and the labels of its shards (``--label-prefix <subset>:``)."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.medmnist import LABELS, MULTI_LABEL
from medclip_train.evaluation.datasets import open_classification, project_meta
from medclip_train.evaluation.prompts import load_prompt_set, shipped_prompt_sets
from tests.data_prep.readback import read_samples

MEDMNIST_SETS = [name for name in shipped_prompt_sets() if name.startswith("medmnist_")]


def test_the_medmnist_family_has_prompt_sets():
    assert len(MEDMNIST_SETS) >= 11 and all(name.removeprefix("medmnist_") in LABELS for name in MEDMNIST_SETS)


def tiny_npz(path, subset: str) -> list[int]:
    """A MedMNIST-format file whose test split holds one image of each class, in label order; returns the labels."""
    n = len(LABELS[subset])
    rng = np.random.default_rng(0)
    labels = np.eye(n, dtype=np.uint8) if subset in MULTI_LABEL else np.arange(n, dtype=np.uint8).reshape(-1, 1)
    arrays = {}
    for split, count in (("train", 1), ("val", 1), ("test", n)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (count, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = labels[:count]
    np.savez(path, **arrays)
    return list(range(n))


@pytest.mark.parametrize("name", MEDMNIST_SETS)
def test_medmnist_prompt_set_keys_are_the_converters_class_names(name, tmp_path, run_cli):
    subset = name.removeprefix("medmnist_")
    npz = tmp_path / f"{subset}.npz"
    test_labels = tiny_npz(npz, subset)
    out = tmp_path / "out"
    code, _, err = run_cli("medmnist", npz, "-o", out)
    assert code == 0, err
    prompts = load_prompt_set(name)
    task = out / "zeroshot" / subset
    folders = sorted(p.name for p in task.iterdir() if p.is_dir())
    assert len(folders) == len(LABELS[subset])  # every class has its one test image
    assert sorted(prompts.classes) == folders
    # The evaluator's own check (it raised "'classnames' keys do not match the class folders" before).
    data = open_classification(task, prompts=name)
    assert data.prompts.classes == folders
    # The shards' labels ("breastmnist:normal, benign") map onto the same classes: each test sample to its own.
    samples = [s for s in read_samples(out) if s["json"]["split"] == "test"]
    shards = open_classification(f"{out}/test-*.tar", prompts=name, label_prefix=f"{subset}:")
    targets = shards.targets([project_meta({"json": s["json"], "txt": s["txt"]}) for s in samples])
    assert targets.skipped == 0 and len(targets.indices) == len(test_labels)
    by_index = {s["json"]["index"]: i for i, s in enumerate(samples)}
    rows = np.asarray(targets.targets)
    for index, label in enumerate(test_labels):
        row = rows[by_index[index]]
        target = int(np.flatnonzero(row)[0]) if targets.multilabel else int(row)
        assert prompts.classnames[target] == LABELS[subset][label]
