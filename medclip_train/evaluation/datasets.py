"""Evaluation data: an image folder, CLIP_benchmark's webdataset layout, or this project's shards.

Every source yields ``(image tensor, key, meta)``; ``meta`` is what the task needs besides the image (a class index,
the ``.json`` labels, the captions). Sources also give a ``fingerprint`` (file names, sizes, mtimes) for the
feature cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension, pil_loader

from medclip_train.data.class_folders import slug
from medclip_train.data.pixels import stack_pixels
from medclip_train.data.sources import expand_shard_pattern
from medclip_train.evaluation.errors import EvalInputError
from medclip_train.evaluation.prompts import PromptSet, default_prompt_set, load_prompt_set, parse_prompt_set

SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
PROMPT_FILE_NAMES = ("prompts.json", "prompts.yaml", "prompts.yml")


# ---------------------------------------------------------------------------------------------------------- sources


class ImageFolderSource:
    """``root/<class>/<image>``; class index = position of the folder name in the sorted folder names."""

    kind = "imagefolder"

    def __init__(self, root: str | Path):
        root = Path(root)
        if not root.is_dir():
            raise EvalInputError(f"{root}: folder not found")
        classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise EvalInputError(f"{root}: no class folders (expected {root}/<class>/<image>)")
        samples = []
        for index, name in enumerate(classes):
            files = sorted(
                f for f in (root / name).iterdir() if f.is_file() and has_file_allowed_extension(f.name, IMG_EXTENSIONS)
            )
            if not files:
                raise EvalInputError(f"{root / name}: empty class folder (no image file with {IMG_EXTENSIONS})")
            samples += [(f, index) for f in files]
        self.root, self.classes, self.samples = root, classes, samples

    def __len__(self) -> int:
        return len(self.samples)

    def fingerprint(self) -> list:
        return [self.kind, str(self.root.resolve())] + [_file_stamp(f, self.root) for f, _ in self.samples]

    def torch_dataset(self, transform) -> Dataset:
        return PathLabelDataset(self.root, self.samples, transform)


class PathLabelDataset(Dataset):
    """Images listed as ``(path, label)`` under ``root``: yields the transformed image, its path relative to the root
    (the feature cache's key) and its label."""

    def __init__(self, root: Path, samples: list, transform):
        self.root, self.samples, self.transform = root, samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        image = load_image(path) if getattr(self.transform, "keeps_grey", False) else pil_loader(str(path))
        return self.transform(image), path.relative_to(self.root).as_posix(), label


def load_image(path) -> Image.Image:
    """The decoded image, greyscale (``L``) left as it is, every other mode as RGB (as ``pil_loader`` gives it), for
    transforms that make it RGB after resizing (``keeps_grey``)."""
    with open(path, "rb") as f:
        image = Image.open(f)
        if image.mode in ("L", "RGB"):
            image.load()
            return image
        return image.convert("RGB")


class ShardReader:
    """Webdataset tars read in order; ``meta_fn`` turns a decoded sample into the task's ``meta``.

    Not training's :class:`medclip_train.data.sources.ShardSource` (a pattern with a mixing weight): this one reads.
    """

    def __init__(self, urls: list[str], meta_fn, kind: str):
        self.urls, self.meta_fn, self.kind = urls, meta_fn, kind

    def fingerprint(self) -> list:
        return [self.kind, getattr(self.meta_fn, "__name__", "")] + [_file_stamp(Path(u)) for u in self.urls]

    def torch_dataset(self, transform, urls: list[str] | None = None, positions: bool = False):
        """Samples of ``urls`` (default: all shards); with ``positions``, each item ends with its
        ``(shard index, index in the shard)`` so that samples read by several workers or ranks can be put in order."""
        import webdataset as wds

        # nodesplitter=None: every rank reads the shards it is given (the suite splits them over ranks itself; under
        # DDP the default single_node_only splitter would raise). Image-less samples (webdataset 1.x yields a key-only
        # one at the end of a shard) are skipped before decoding.
        order = _ShardOrder(self.urls) if positions else None
        return (
            wds.WebDataset(
                self.urls if urls is None else urls, shardshuffle=False, empty_check=False, nodesplitter=None
            )
            .select(_has_image)
            .decode("pil")
            .map(partial(_shard_item, transform=transform, meta_fn=self.meta_fn, order=order))
        )


class _ShardOrder:
    """``(shard index, index in the shard)`` of each sample: a loader worker reads whole shards, so its own count of
    a shard's samples is their index in it."""

    def __init__(self, urls: list[str]):
        self.index, self.seen = {url: i for i, url in enumerate(urls)}, {}

    def __call__(self, url: str) -> tuple[int, int]:
        n = self.seen.get(url, 0)
        self.seen[url] = n + 1
        return self.index[url], n


def _has_image(sample: dict) -> bool:
    return any(ext in sample for ext in SHARD_IMAGE_EXTS)


def _shard_item(sample: dict, transform, meta_fn, order: _ShardOrder | None = None):
    image = next(sample[ext] for ext in SHARD_IMAGE_EXTS if ext in sample)
    item = (transform(image), sample["__key__"], meta_fn(sample))
    return item if order is None else (*item, order(sample["__url__"]))


def project_meta(sample: dict) -> dict:
    """This project's shards: ``key.txt`` is the caption, ``key.json`` carries ``labels`` like ``modality:xray``."""
    info = sample.get("json") or {}
    caption = sample.get("txt")
    return {"labels": [str(x) for x in info.get("labels", [])], "captions": [caption.strip()] if caption else []}


def clip_benchmark_class_meta(sample: dict):
    """CLIP_benchmark classification: ``.cls`` class index, or ``.npy`` multi-hot vector (multi-label sets)."""
    if "cls" in sample:
        return int(sample["cls"])
    return [int(x) for x in np.asarray(sample["npy"]).reshape(-1)]


def clip_benchmark_retrieval_meta(sample: dict) -> dict:
    """CLIP_benchmark retrieval: one caption per line of ``.txt`` (as its ``build_wds_dataset`` splits them)."""
    return {"labels": [], "captions": [c.strip() for c in (sample.get("txt") or "").splitlines() if c.strip()]}


def _file_stamp(path: Path, root: Path | None = None) -> list:
    try:
        stat = path.stat()
    except FileNotFoundError as err:
        raise EvalInputError(f"{path}: file not found") from err
    name = path.relative_to(root).as_posix() if root else str(path.resolve())
    return [name, stat.st_size, stat.st_mtime_ns]


def collate(batch):
    """Stack images; keep keys, metas (and shard positions) as lists (the default collate mangles dicts of lists).

    In a loader worker the batch is stacked straight into shared memory (``stack_pixels``, the training loader's), so
    that sending it to the main process copies nothing more.
    """
    images, *columns = zip(*batch)
    return stack_pixels(list(images)), *(list(column) for column in columns)


def expand_shards(pattern: str) -> list[str]:
    """Brace patterns (``test-{000000..000003}.tar``) and globs; every expanded file must exist."""
    urls = expand_shard_pattern(pattern)
    if not urls:
        raise EvalInputError(f"{pattern}: no shard file matches")
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        raise EvalInputError(f"{pattern}: shard file not found: {missing[0]}" + (" ..." if len(missing) > 1 else ""))
    return urls


def is_shard_pattern(spec: str) -> bool:
    return ".tar" in spec and not os.path.isdir(spec)


# ------------------------------------------------------------------------------------------------ classification


@dataclass
class ClassificationData:
    """One classification dataset: where the images come from, its classes, and its prompts (for zero-shot)."""

    name: str
    source: ImageFolderSource | ShardReader
    classes: list[str] | None
    """Class ids in label order; ``None`` for project shards without a prompt file (taken from the labels)."""
    prompts: PromptSet | None
    label_prefix: str | None = None

    def targets(self, metas: list, classes: list[str] | None = None) -> LabelledTargets:
        """Class targets of the encoded samples (same order), and which samples they are.

        Args:
            metas: the ``metas`` of the encoded samples.
            classes: project shards only: the class list to map labels onto (default: ``self.classes``, else the
                sorted labels found), so that several splits share one.
        """
        if self.source.kind == "project":
            return _targets_from_labels(metas, classes or self.classes, self.label_prefix or "")
        if metas and isinstance(metas[0], list):  # CLIP_benchmark multi-hot
            return LabelledTargets(np.arange(len(metas)), np.asarray(metas, dtype=np.int64), True, list(self.classes))
        return LabelledTargets(np.arange(len(metas)), np.asarray(metas, dtype=np.int64), False, list(self.classes))


@dataclass
class LabelledTargets:
    indices: np.ndarray
    """Which encoded samples have a target (project shards may hold samples without a label of the prefix)."""
    targets: np.ndarray
    """(N,) class indices, or (N, C) multi-hot when ``multilabel``."""
    multilabel: bool
    classes: list[str]
    skipped: int = 0


def _targets_from_labels(metas: list[dict], classes: list[str] | None, prefix: str) -> LabelledTargets:
    per_sample = [[lab[len(prefix) :] for lab in m["labels"] if lab.startswith(prefix)] for m in metas]
    if classes is None:
        classes = sorted({c for labels in per_sample for c in labels})
        if not classes:
            raise EvalInputError(f"--label-prefix {prefix!r}: no sample has a label starting with it")
    index = {c: i for i, c in enumerate(classes)}
    # Prompt sets are keyed by class folder (medclip-prep's folder-safe names, "normal_benign"), the shards' labels by
    # name ("breastmnist:normal, benign"): a label that is not a class as it is matches by its folder name.
    matched = [[index.get(c, index.get(slug(c))) for c in labels] for labels in per_sample]
    per_sample = [list(dict.fromkeys(i for i in labels if i is not None)) for labels in matched]
    keep = np.array([i for i, labels in enumerate(per_sample) if labels], dtype=np.int64)
    if not len(keep):
        raise EvalInputError(f"--label-prefix {prefix!r}: no sample has a label of the classes {classes}")
    multilabel = any(len(labels) > 1 for labels in per_sample)
    if multilabel:
        targets = np.zeros((len(keep), len(classes)), dtype=np.int64)
        for row, i in enumerate(keep):
            targets[row, per_sample[i]] = 1
    else:
        targets = np.array([per_sample[i][0] for i in keep], dtype=np.int64)
    return LabelledTargets(keep, targets, multilabel, list(classes), skipped=len(metas) - len(keep))


def open_classification(
    spec: str | Path,
    prompts: str | Path | None = None,
    label_prefix: str | None = None,
    split: str = "test",
    with_prompts: bool = True,
) -> ClassificationData:
    """Open an image folder, a CLIP_benchmark webdataset folder, or a pattern of project shards.

    Args:
        spec: ``root`` with ``root/<class>/*``; a folder with ``classnames.txt`` and ``{split}/*.tar``; or a
            brace/glob pattern of project shards (needs ``label_prefix``).
        prompts: prompt file or shipped set; default: the folder's ``prompts.json`` (or CLIP_benchmark's text
            files), else folder names with a generic template.
        label_prefix: for project shards, the prefix of the ``.json`` labels that name the class (``modality:``).
        split: the split folder of a CLIP_benchmark dataset.
        with_prompts: load prompts (zero-shot); the linear probe does not need them.
    """
    spec = str(spec)
    if is_shard_pattern(spec):
        if label_prefix is None:
            raise EvalInputError(f"{spec}: --label-prefix is required to take classes from the shards' .json labels")
        prompt_set = load_prompt_set(prompts) if (prompts and with_prompts) else None
        source = ShardReader(expand_shards(spec), project_meta, "project")
        name = (prompt_set.name if prompt_set and prompt_set.name else None) or label_prefix.rstrip(":") or "labels"
        classes = prompt_set.classes if prompt_set else None
        return ClassificationData(name, source, classes, prompt_set, label_prefix)
    root = Path(spec)
    if not root.is_dir():
        raise EvalInputError(f"{root}: folder not found")
    if (root / "classnames.txt").is_file():
        return _open_clip_benchmark(root, prompts, split, with_prompts)
    source = ImageFolderSource(root)
    prompt_set = None
    if with_prompts:
        prompt_file = prompts or next((root / n for n in PROMPT_FILE_NAMES if (root / n).is_file()), None)
        prompt_set = load_prompt_set(prompt_file, source.classes) if prompt_file else default_prompt_set(source.classes)
    # The folder name, not the prompt set's: callers (training, ``all``) address tasks by their folders.
    return ClassificationData(root.name, source, source.classes, prompt_set)


def _open_clip_benchmark(root: Path, prompts, split: str, with_prompts: bool) -> ClassificationData:
    # Class ids are the label indices ("0", "1", ...) in label order, so a prompt file keyed by index (or a list in
    # label order) fits; classnames.txt gives the display names.
    names = [line.strip() for line in (root / "classnames.txt").read_text().splitlines() if line.strip()]
    classes = [str(i) for i in range(len(names))]
    source = ShardReader(clip_benchmark_shards(root, split), clip_benchmark_class_meta, "clip_benchmark")
    prompt_set = None
    if with_prompts:
        if prompts:
            prompt_set = load_prompt_set(prompts, classes)
        else:
            templates_file = root / "zeroshot_classification_templates.txt"
            if not templates_file.is_file():
                raise EvalInputError(f"{templates_file}: not found (or pass --prompts)")
            templates = [t.strip() for t in templates_file.read_text().splitlines() if t.strip()]
            data = {"classnames": names, "templates": templates, "source": "CLIP_benchmark webdataset text files"}
            prompt_set = parse_prompt_set(data, classes, where=str(templates_file))
    return ClassificationData(root.name, source, classes, prompt_set)


def clip_benchmark_shards(root: Path, split: str) -> list[str]:
    """``root/{split}/{0..n-1}.tar`` as CLIP_benchmark's ``build_wds_dataset`` reads them (``nshards.txt``)."""
    split_dir = root / split
    nshards_file = split_dir / "nshards.txt"
    if nshards_file.is_file():
        return expand_shards(str(split_dir / f"{{0..{int(nshards_file.read_text().strip()) - 1}}}.tar"))
    if not split_dir.is_dir():
        raise EvalInputError(f"{split_dir}: split folder not found")
    # Without nshards.txt: numeric order, as the shards are numbered.
    tars = sorted(split_dir.glob("*.tar"), key=lambda p: (len(p.stem), p.stem))
    if not tars:
        raise EvalInputError(f"{split_dir}: no .tar shards")
    return [str(t) for t in tars]


# ------------------------------------------------------------------------------------------------------ retrieval


def open_retrieval(spec: str | Path, split: str = "test") -> ShardReader:
    """Image-caption pairs: a pattern of project shards, or a CLIP_benchmark retrieval folder (captions per line)."""
    spec = str(spec)
    if is_shard_pattern(spec):
        return ShardReader(expand_shards(spec), project_meta, "project")
    root = Path(spec)
    if not root.is_dir():
        raise EvalInputError(f"{spec}: not a shard pattern (*.tar) nor a folder")
    return ShardReader(clip_benchmark_shards(root, split), clip_benchmark_retrieval_meta, "clip_benchmark_retrieval")
