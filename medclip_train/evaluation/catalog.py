"""The evaluation catalog of ``medclip-eval suite``: datasets, their on-disk layout, classes, prompts and tasks.

A catalog is YAML (``medclip_train/evaluation/catalogs/medical.yaml`` ships the public medical sets)::

    settings: {folds: 5, shots: [1, 4, 16], knn_k: 20, seed: 0}   # optional, these are the defaults
    datasets:
      - name: breastmnist
        layout: medmnist_npz          # imagefolder | medmnist_npz | csv | clip_benchmark | shards
        path: medmnist/breastmnist.npz   # relative to --data-root (absolute paths are kept)
        split: test                   # npz key prefix / CLIP_benchmark split folder
        classes: [malignant, normal_benign]   # npz, csv: class ids in label-index order
        prompts: medmnist_breastmnist # a shipped set (evaluation/prompt_sets/) or a prompt file
        modality: ultrasound
        tasks: [zeroshot, probe_cv, few_shot, feature_map, overlay]   # default: all of them

A dataset whose path is absent under ``--data-root`` is reported as skipped (with the path looked for), so one
catalog serves users who hold only some of the sets.
"""

from __future__ import annotations

import csv
import fnmatch
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from torch.utils.data import Dataset

from medclip_train.evaluation.datasets import (
    ClassificationData,
    ImageFolderSource,
    PathLabelDataset,
    _file_stamp,
    expand_shards,
    open_classification,
)
from medclip_train.evaluation.errors import EvalInputError
from medclip_train.evaluation.prompts import load_prompt_set

LAYOUTS = ("imagefolder", "medmnist_npz", "csv", "clip_benchmark", "shards")
TASKS = ("zeroshot", "probe_cv", "few_shot", "feature_map", "overlay")
CATALOG_DIR = Path(__file__).resolve().parent / "catalogs"  # package data: installed with the wheel
"""Catalogs shipped with the project, addressable by file stem (``--catalog medical``)."""


@dataclass
class SuiteSettings:
    folds: int = 5
    """k of the stratified k-fold cross-validation of the probes (lowered to the smallest class's size)."""
    shots: list[int] = field(default_factory=lambda: [1, 4, 16])
    """Few-shot linear probe: training samples per class."""
    knn_k: int = 20
    """Neighbours of the kNN probe (at most the training fold's size)."""
    seed: int = 0


@dataclass
class CatalogEntry:
    name: str
    layout: str
    path: str
    prompts: str | None = None
    classes: list[str] | None = None
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    modality: str = ""
    split: str = "test"
    label_prefix: str | None = None
    """``shards`` layout: the ``.json`` label prefix naming the class (``breastmnist:``)."""
    exclude: list[str] = field(default_factory=list)
    """``imagefolder``: file-name globs left out (BUSI keeps its ``*_mask.png`` next to the images)."""
    path_column: str = "path"
    label_column: str = "label"

    def location(self, data_root: str | Path) -> Path:
        return Path(data_root) / self.path  # an absolute ``path`` stays as it is

    def is_present(self, data_root: str | Path) -> bool:
        where = self.location(data_root)
        if self.layout == "shards":
            try:
                return bool(expand_shards(str(where)))
            except EvalInputError:  # no shard matches the pattern, or one it names is missing
                return False
        return where.exists()

    def open(self, data_root: str | Path) -> ClassificationData:
        """The dataset as the evaluators read it, with its prompt set checked against its classes."""
        where = self.location(data_root)
        if self.layout in ("imagefolder", "clip_benchmark"):
            data = open_classification(where, self.prompts, split=self.split)
            if self.exclude:
                data.source = _without(data.source, self.exclude)
            data.name = self.name
            return data
        if self.layout == "shards":
            data = open_classification(str(where), self.prompts, label_prefix=self.label_prefix)
            data.name = self.name
            return data
        source = NpzSource(where, self.split) if self.layout == "medmnist_npz" else CsvSource(where, self)
        source.check_labels(len(self.classes))
        prompts = load_prompt_set(self.prompts, self.classes) if self.prompts else None
        return ClassificationData(self.name, source, list(self.classes), prompts)


def _without(source: ImageFolderSource, patterns: list[str]) -> ImageFolderSource:
    source.samples = [(f, c) for f, c in source.samples if not any(fnmatch.fnmatch(f.name, p) for p in patterns)]
    return source


# ---------------------------------------------------------------------------------------------------------- sources


class NpzSource:
    """A MedMNIST ``.npz``: ``{split}_images`` (N, H, W) or (N, H, W, 3) uint8, ``{split}_labels`` (N,) or (N, 1)."""

    kind = "medmnist_npz"

    def __init__(self, path: Path, split: str):
        self.path, self.split = Path(path), split
        with np.load(self.path) as arrays:
            for key in (f"{split}_images", f"{split}_labels"):
                if key not in arrays.files:
                    raise EvalInputError(f"{self.path}: no array {key!r} (has {sorted(arrays.files)})")
            labels = arrays[f"{split}_labels"]
        if labels.ndim == 2 and labels.shape[1] != 1:
            raise EvalInputError(f"{self.path}: {split}_labels {labels.shape} is multi-label; the suite needs one")
        self.labels = labels.reshape(-1).astype(np.int64)

    def __len__(self) -> int:
        return len(self.labels)

    def check_labels(self, num_classes: int) -> None:
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= num_classes):
            raise EvalInputError(f"{self.path}: labels outside 0..{num_classes - 1} of the catalog's classes")

    def fingerprint(self) -> list:
        return [self.kind, self.split, _file_stamp(self.path)]

    def torch_dataset(self, transform) -> Dataset:
        return _NpzDataset(self.path, self.split, self.labels, transform)


class _NpzDataset(Dataset):
    def __init__(self, path: Path, split: str, labels: np.ndarray, transform):
        self.path, self.split, self.labels, self.transform = path, split, labels, transform

    @cached_property
    def images(self) -> np.ndarray:
        # Read in the process that decodes (each loader worker once), not pickled to every worker.
        with np.load(self.path) as arrays:
            return arrays[f"{self.split}_images"]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        image = Image.fromarray(self.images[i])
        if not (image.mode == "L" and getattr(self.transform, "keeps_grey", False)):
            image = image.convert("RGB")
        return self.transform(image), f"{self.split}_{i:06d}", int(self.labels[i])


class CsvSource:
    """A CSV with a path column (relative to the CSV's folder) and a label column (a class id of the catalog)."""

    kind = "csv"

    def __init__(self, path: Path, entry: CatalogEntry):
        self.path = Path(path)
        index = {c: i for i, c in enumerate(entry.classes)}
        with self.path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for column in (entry.path_column, entry.label_column):
                if column not in (reader.fieldnames or []):
                    raise EvalInputError(f"{self.path}: no column {column!r} (has {reader.fieldnames})")
            rows = list(reader)
        self.samples = []
        for line, row in enumerate(rows, start=2):
            label = row[entry.label_column].strip()
            if label not in index:
                raise EvalInputError(f"{self.path}:{line}: label {label!r} is not one of the classes {entry.classes}")
            self.samples.append((self.path.parent / row[entry.path_column].strip(), index[label]))

    def __len__(self) -> int:
        return len(self.samples)

    def check_labels(self, num_classes: int) -> None:
        pass  # every label was matched to a class on reading

    def fingerprint(self) -> list:
        return [self.kind, _file_stamp(self.path)] + [_file_stamp(p, self.path.parent) for p, _ in self.samples]

    def torch_dataset(self, transform) -> Dataset:
        return PathLabelDataset(self.path.parent, self.samples, transform)


# ---------------------------------------------------------------------------------------------------------- loading


@dataclass
class Catalog:
    datasets: list[CatalogEntry]
    settings: SuiteSettings
    path: str = ""


def resolve_catalog_path(spec: str | Path) -> Path:
    path = Path(spec)
    if path.is_file():
        return path
    shipped = CATALOG_DIR / f"{spec}.yaml"
    if shipped.is_file():
        return shipped
    raise EvalInputError(f"--catalog {spec}: no such file, and not a shipped catalog in {CATALOG_DIR}")


def load_catalog(spec: str | Path) -> Catalog:
    """Parse and validate a catalog; every error names the file and the field (``datasets[2].layout``)."""
    path = resolve_catalog_path(spec)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise EvalInputError(f"--catalog {path}: cannot parse YAML: {err}") from err
    if not isinstance(data, dict) or not isinstance(data.get("datasets"), list) or not data["datasets"]:
        raise EvalInputError(f"--catalog {path}: needs a non-empty 'datasets' list")
    settings = _parse_settings(data.get("settings") or {}, path)
    entries = [_parse_entry(item, f"--catalog {path}: datasets[{i}]") for i, item in enumerate(data["datasets"])]
    names = [e.name for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise EvalInputError(f"--catalog {path}: dataset names repeat: {duplicates}")
    return Catalog(entries, settings, str(path))


def _parse_settings(value: dict, path: Path) -> SuiteSettings:
    known = set(SuiteSettings.__dataclass_fields__)
    unknown = sorted(set(value) - known)
    if unknown:
        raise EvalInputError(f"--catalog {path}: settings: unknown keys {unknown} (known: {sorted(known)})")
    settings = SuiteSettings(**value)
    if settings.folds < 2:
        raise EvalInputError(f"--catalog {path}: settings.folds must be at least 2")
    if not all(isinstance(k, int) and k >= 1 for k in settings.shots):
        raise EvalInputError(f"--catalog {path}: settings.shots must be positive integers")
    return settings


def _parse_entry(item, where: str) -> CatalogEntry:
    if not isinstance(item, dict):
        raise EvalInputError(f"{where}: must be a mapping with name, layout and path")
    known = set(CatalogEntry.__dataclass_fields__)
    unknown = sorted(set(item) - known)
    if unknown:
        raise EvalInputError(f"{where}: unknown keys {unknown} (known: {sorted(known)})")
    for key in ("name", "layout", "path"):
        if not isinstance(item.get(key), str) or not item[key]:
            raise EvalInputError(f"{where}.{key}: required (a non-empty string)")
    entry = CatalogEntry(**item)
    where = f"{where} ({entry.name})"
    if entry.layout not in LAYOUTS:
        raise EvalInputError(f"{where}.layout: {entry.layout!r} is not one of {list(LAYOUTS)}")
    bad_tasks = [t for t in entry.tasks if t not in TASKS]
    if bad_tasks or not entry.tasks:
        raise EvalInputError(f"{where}.tasks: {bad_tasks or 'empty'}; choose from {list(TASKS)}")
    if entry.layout in ("medmnist_npz", "csv") and not entry.classes:
        raise EvalInputError(f"{where}.classes: required for layout {entry.layout} (class ids in label order)")
    if entry.layout == "shards" and not entry.label_prefix:
        raise EvalInputError(f"{where}.label_prefix: required for layout shards")
    if "zeroshot" in entry.tasks and entry.layout in ("medmnist_npz", "csv", "shards") and not entry.prompts:
        raise EvalInputError(f"{where}.prompts: required for zero-shot on layout {entry.layout}")
    return entry
