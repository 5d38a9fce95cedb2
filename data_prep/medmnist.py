"""MedMNIST v2 2D subsets (``.npz``) as captioned samples, plus a zero-shot folder of the test split.

An ``.npz`` holds ``{train,val,test}_images`` (``(N, H, W)`` or ``(N, H, W, 3)`` uint8) and ``{split}_labels``
(``(N,)`` or ``(N, 1)`` class indices, or ``(N, 14)`` 0/1 for the multi-label ChestMNIST). Captions come from templates
that name the imaging type and the class; ``labels`` are ``"<subset>:<official label name>"`` with the official names
of MedMNIST v2 (``medmnist/info.py``); images are written as lossless PNG.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.images import ArrayImage
from data_prep.records import PrepError, Reason, Record, Rejection, short_hash
from data_prep.zeroshot_folders import write_task
from medclip_train.data.class_folders import slug

SOURCE = "medmnist"
SPLITS = ("train", "val", "test")
LICENCE = "CC BY 4.0"

_ORGAN_LABELS = (
    "bladder",
    "femur-left",
    "femur-right",
    "heart",
    "kidney-left",
    "kidney-right",
    "liver",
    "lung-left",
    "lung-right",
    "pancreas",
    "spleen",
)

# Official MedMNIST v2 label names, in label-index order (INFO[subset]["label"] of medmnist/info.py).
LABELS: dict[str, tuple[str, ...]] = {
    "pathmnist": (
        "adipose",
        "background",
        "debris",
        "lymphocytes",
        "mucus",
        "smooth muscle",
        "normal colon mucosa",
        "cancer-associated stroma",
        "colorectal adenocarcinoma epithelium",
    ),
    "chestmnist": (
        "atelectasis",
        "cardiomegaly",
        "effusion",
        "infiltration",
        "mass",
        "nodule",
        "pneumonia",
        "pneumothorax",
        "consolidation",
        "edema",
        "emphysema",
        "fibrosis",
        "pleural",
        "hernia",
    ),
    "dermamnist": (
        "actinic keratoses and intraepithelial carcinoma",
        "basal cell carcinoma",
        "benign keratosis-like lesions",
        "dermatofibroma",
        "melanoma",
        "melanocytic nevi",
        "vascular lesions",
    ),
    "octmnist": ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
    "pneumoniamnist": ("normal", "pneumonia"),
    "retinamnist": ("0", "1", "2", "3", "4"),
    "breastmnist": ("malignant", "normal, benign"),
    "bloodmnist": (
        "basophil",
        "eosinophil",
        "erythroblast",
        "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
        "lymphocyte",
        "monocyte",
        "neutrophil",
        "platelet",
    ),
    "tissuemnist": (
        "Collecting Duct, Connecting Tubule",
        "Distal Convoluted Tubule",
        "Glomerular endothelial cells",
        "Interstitial endothelial cells",
        "Leukocytes",
        "Podocytes",
        "Proximal Tubule Segments",
        "Thick Ascending Limb",
    ),
    "organamnist": _ORGAN_LABELS,
    "organcmnist": _ORGAN_LABELS,
    "organsmnist": _ORGAN_LABELS,
}
MULTI_LABEL = frozenset({"chestmnist"})


@dataclass(frozen=True)
class SubsetText:
    """How captions describe a subset.

    Attributes:
        modality: ``modality`` field of the samples.
        image: what the image is, as a caption would say it.
        phrases: caption wording for official names that read badly in a sentence (``"femur-left"``).
    """

    modality: str
    image: str
    phrases: tuple[tuple[str, str], ...] = ()


_ORGAN_PHRASES = tuple((n, " ".join(reversed(n.split("-")))) for n in _ORGAN_LABELS if "-" in n)
TEXT: dict[str, SubsetText] = {
    "pathmnist": SubsetText("histopathology", "H&E stained colorectal histology patch"),
    "chestmnist": SubsetText("xray", "frontal chest x-ray"),
    "dermamnist": SubsetText("dermatoscopy", "dermatoscopic image of a skin lesion"),
    "octmnist": SubsetText("oct", "retinal OCT scan"),
    "pneumoniamnist": SubsetText("xray", "pediatric chest x-ray"),
    "retinamnist": SubsetText(
        "fundus", "retinal fundus photograph", tuple((g, f"diabetic retinopathy grade {g}") for g in "01234")
    ),
    "breastmnist": SubsetText(
        "ultrasound", "breast ultrasound image", (("normal, benign", "normal or benign tissue"),)
    ),
    "bloodmnist": SubsetText(
        "microscopy",
        "blood smear microscopy image",
        (("immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "immature granulocytes"),),
    ),
    "tissuemnist": SubsetText("microscopy", "kidney cortex cell microscopy image"),
    "organamnist": SubsetText("ct", "axial abdominal CT slice", _ORGAN_PHRASES),
    "organcmnist": SubsetText("ct", "coronal abdominal CT slice", _ORGAN_PHRASES),
    "organsmnist": SubsetText("ct", "sagittal abdominal CT slice", _ORGAN_PHRASES),
}
TEMPLATES = ("{image} showing {c}.", "{image} of {c}.", "{c} in a {image}.")
NO_FINDING = "no finding"


def subset_of(path: Path, subset: str | None) -> str:
    """The subset name: given, or from the file name (``breastmnist.npz``, ``breastmnist_224.npz``)."""
    name = (subset or re.sub(r"_\d+$", "", path.stem)).lower()
    if name not in LABELS:
        raise PrepError(f"{path}: unknown MedMNIST subset {name!r}; pass --subset (one of {', '.join(LABELS)})")
    return name


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a MedMNIST file, checked for the keys and shapes every split needs."""
    if not path.is_file():
        raise PrepError(f"MedMNIST file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise PrepError(f"{path}: not a readable .npz ({e})") from None
    for split in SPLITS:
        for kind in ("images", "labels"):
            if f"{split}_{kind}" not in arrays:
                raise PrepError(f"{path}: missing array {split}_{kind}")
        if len(arrays[f"{split}_images"]) != len(arrays[f"{split}_labels"]):
            raise PrepError(f"{path}: {split}_images and {split}_labels differ in length")
    return arrays


def class_phrase(subset: str, name: str) -> str:
    """How a caption says the official label ``name``."""
    return dict(TEXT[subset].phrases).get(name, name.lower() if subset == "tissuemnist" else name)


def caption_for(subset: str, names: list[str], choice: int) -> str:
    """One caption from the subset's templates; ``names`` are official label names (several for ChestMNIST)."""
    text = TEXT[subset]
    phrase = " and ".join(class_phrase(subset, n) for n in names) if names else NO_FINDING
    caption = TEMPLATES[choice % len(TEMPLATES)].format(image=text.image, c=phrase)
    return caption[0].upper() + caption[1:]


def label_names(subset: str, label: np.ndarray) -> list[str]:
    """Official names of one sample's label row.

    Raises:
        ValueError: for an index outside the subset's classes or a multi-label row of the wrong length.
    """
    names = LABELS[subset]
    flat = np.asarray(label).reshape(-1)
    if subset in MULTI_LABEL:
        if flat.size != len(names):
            raise ValueError(f"expected {len(names)} labels, got {flat.size}")
        return [names[i] for i in np.flatnonzero(flat)]
    if flat.size != 1 or not 0 <= int(flat[0]) < len(names):
        raise ValueError(f"label {flat.tolist()} outside 0..{len(names) - 1}")
    return [names[int(flat[0])]]


def read_records(path: Path, arrays: dict[str, np.ndarray], subset: str, seed: int = 0) -> Iterator[Record | Rejection]:
    """Yield one record per image, splits in train, val, test order."""
    for split in SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        for i in range(len(images)):
            rid = f"{subset}_{split}_{i}"
            try:
                names = label_names(subset, labels[i])
            except ValueError as e:
                yield Rejection(SOURCE, rid, str(path), Reason.MALFORMED_RECORD, str(e), None, split)
                continue
            choice = int(short_hash(f"{seed}:{rid}"), 16)
            meta = {
                "modality": TEXT[subset].modality,
                "cuis": [],
                "labels": [f"{subset}:{n}" for n in names],
                "licence": LICENCE,
                "subset": subset,
                "index": i,
            }
            caption = caption_for(subset, names, choice)
            yield Record(SOURCE, rid, split, caption, ArrayImage(images[i]), str(path), meta)


def export_zeroshot(arrays: dict[str, np.ndarray], subset: str, task_dir: Path) -> dict:
    """Write the test split as ``task_dir/<class slug>/<index>.png`` with ``prompts.json``.

    Multi-label ChestMNIST keeps only test images with exactly one positive label (a folder per class cannot hold
    the others).
    """
    names = LABELS[subset]
    classnames = {slug(n): class_phrase(subset, n) for n in names}
    image = TEXT[subset].image
    templates = [t.format(image=image, c="{c}") for t in TEMPLATES] + ["a {c}.", "{c}."]

    def items():
        for i, (pixels, label) in enumerate(zip(arrays["test_images"], arrays["test_labels"], strict=True)):
            try:
                found = label_names(subset, label)
            except ValueError:
                continue
            if len(found) == 1:
                yield slug(found[0]), f"{i:06d}", pixels

    note = "test images with exactly one positive label only" if subset in MULTI_LABEL else None
    counts = write_task(task_dir, f"medmnist_{subset}", "medclip-prep medmnist", classnames, templates, items(), note)
    return {"images": sum(counts.values()), "classes": counts}
