"""The demo dataset: generated, never downloaded (``medclip-prep demo --output DIR``).

Four modalities (chest x-ray, chest CT, brain MRI, H&E histology), half of the images with a nodule (left or right,
small or large, anywhere in a range of heights), clinical-style captions from several templates per modality that
name a nodule's diameter in mm, side and place ("a 12 mm nodule in the left upper zone") and describe a normal image
in words of its own ("clear lungs, normal study"), and::

    DIR/{train,val,test}-NNNNNN.tar, sizes.json, manifest.json, rejected.jsonl   as for every converter
    DIR/tokenizer/                       WordPiece tokenizer trained on the train captions
    DIR/zeroshot/modality/<class>/*.png  test split by modality (xray, ct, mri, histology) + prompts.json
    DIR/zeroshot/nodule/<class>/*.png    test split by finding (nodule, normal) + prompts.json

Each image is drawn from its own random generator seeded by ``(seed, split, index)``, so the output is the same for a
seed whatever the number of workers.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.demo_images import CLUSTER_RADII, MODALITIES, SIZES, Lesion, place_lesion, render
from data_prep.images import ArrayImage
from data_prep.records import Record
from data_prep.tokenizer import train_wordpiece
from data_prep.writer import Summary, WriteOptions, package_version, write_dataset
from data_prep.zeroshot_folders import write_task

SOURCE = "demo"
LICENCE = "CC0-1.0"
# Bump when images, captions or the tokenizer change: an existing demo made by another version is then regenerated.
GENERATOR_VERSION = 3
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

# Captions describe what the image shows in words a 2-layer BERT learns within the demo's 300 steps. A finding is
# named with its own words (its size in mm, side, and height or depth in the organ, so that a caption picks out
# few test images, which makes retrieval meaningful); a normal image with words of its own ("clear", "normal",
# "unremarkable"). Normal captions never say "no nodule": a caption that differs from a positive one only by a
# negation teaches the tiny text tower nothing it can learn in that time (nodule zero-shot stayed at chance).
FINDING_TEMPLATES = {
    "xray": (
        "Chest radiograph: {a} {mm} mm nodule in the {side} {zone} zone Impression: nodule.",
        "Frontal chest x-ray with {a} {mm} mm pulmonary nodule in the {side} {zone} zone Impression: nodule.",
        "PA chest x-ray demonstrating {a} {mm} mm {side} {zone} zone nodule Impression: nodule.",
    ),
    "ct": (
        "Axial CT slice: {a} {mm} mm nodule in the {zone} {side} lung Impression: nodule.",
        "Chest CT scan, axial view, with {a} {mm} mm pulmonary nodule in the {zone} {side} lung Impression: nodule.",
        "CT image of the chest demonstrating {a} {mm} mm nodule, {side} lung, {zone} Impression: nodule.",
    ),
    "mri": (
        "Axial brain MRI: {a} {mm} mm nodule in the {side} {zone} lobe Impression: nodule.",
        "T2-weighted MRI of the brain with {a} {mm} mm hyperintense nodule in the {side} {zone} lobe"
        " Impression: nodule.",
        "Brain MRI demonstrating {a} {mm} mm focal nodule in the {side} {zone} lobe Impression: nodule.",
    ),
    "histology": (
        "H&E stained histology section: {a} {mm} mm nodule of atypical cells in the {zone} {side} of the field"
        " Impression: nodule.",
        "Histopathology slide, H&E stain, with {a} {mm} mm nodule of atypical nuclei, {zone} {side} of the field"
        " Impression: nodule.",
        "H&E micrograph demonstrating {a} {mm} mm nodule of atypical cells in the {zone} {side} field"
        " Impression: nodule.",
    ),
}
NORMAL_TEMPLATES = {
    "xray": (
        "Chest radiograph: clear lungs, normal study Impression: normal.",
        "Frontal chest x-ray, lungs clear, unremarkable Impression: normal.",
        "Normal PA chest x-ray with clear lung fields Impression: normal.",
    ),
    "ct": (
        "Axial CT slice: clear lungs, normal study Impression: normal.",
        "Chest CT scan, axial view, lungs clear, unremarkable Impression: normal.",
        "Normal CT image of the chest with clear lung parenchyma Impression: normal.",
    ),
    "mri": (
        "Axial brain MRI: normal study, symmetric hemispheres Impression: normal.",
        "T2-weighted MRI of the brain, unremarkable Impression: normal.",
        "Normal brain MRI with symmetric ventricles Impression: normal.",
    ),
    "histology": (
        "H&E stained histology section: normal tissue architecture Impression: normal.",
        "Histopathology slide, H&E stain, unremarkable tissue Impression: normal.",
        "Normal H&E micrograph with evenly scattered nuclei Impression: normal.",
    ),
}
# Where the lesion is, in each modality's words: its vertical image position is height on a radiograph and in a
# histology field, depth (top = anterior) on an axial CT or MRI slice. The split is the middle of the drawn range.
ZONES = {
    "xray": (-0.065, "upper", "lower"),
    "ct": (-0.05, "anterior", "posterior"),
    "mri": (0.0, "frontal", "occipital"),
    "histology": (0.0, "upper", "lower"),
}
# Nominal millimetres per normalised unit (half the image width): the two size classes read as typical nodule
# diameters, 10-14 mm and 17-23 mm; a histology field is 1 mm across (clusters of 0.18 and 0.32 mm).
MM_PER_UNIT = {"xray": 50.0, "ct": 50.0, "mri": 50.0, "histology": 0.5}

# Zero-shot prompts phrased like the captions above.
MODALITY_CLASSNAMES = {
    "xray": "chest x-ray",
    "ct": "chest ct scan",
    "mri": "brain mri",
    "histology": "h&e stained histology section",
}
MODALITY_TEMPLATES = ["a {c}.", "an image of a {c}.", "a {c} image.", "{c}."]
# The nodule task's prompts are written as the captions are (see nodule_prompts()): each class in words of its own,
# never "a nodule" against "no nodule".
NODULE_CLASSNAMES = {"nodule": "nodule", "normal": "normal"}


def finding_caption(template: str, mm: float, side: str, zone: str) -> str:
    """A FINDING_TEMPLATES sentence filled in: "an 11 mm nodule", "a 0.32 mm nodule"."""
    mm_text = f"{mm:g}"
    article = "an" if re.match(r"(8|11|18)(\D|$)", mm_text) else "a"
    return template.format(a=article, mm=mm_text, side=side, zone=zone)


def nodule_prompts() -> dict[str, list[str]]:
    """Prompts per class of the nodule task: every caption template of every modality, filled in for both sides,
    both places and each size class's nominal diameter (nodule); every normal caption (normal)."""
    nodule = []
    for modality, templates in FINDING_TEMPLATES.items():
        _, top, bottom = ZONES[modality]
        radii = CLUSTER_RADII if modality == "histology" else SIZES
        diameters = [round(2 * r * MM_PER_UNIT[modality], 2) for r in radii.values()]
        for template, mm, side, zone in itertools.product(templates, diameters, ("left", "right"), (top, bottom)):
            nodule.append(finding_caption(template, mm, side, zone))
    return {"nodule": nodule, "normal": [t for templates in NORMAL_TEMPLATES.values() for t in templates]}


@dataclass(frozen=True)
class DemoSample:
    """Everything that defines one demo sample; ``render()`` draws its image (in a worker when there are several).

    Attributes:
        split: ``train``, ``val`` or ``test``.
        index: position in the split.
        modality: one of :data:`~data_prep.demo_images.MODALITIES`.
        nodule: whether a nodule/lesion is drawn.
        side: ``left``/``right`` when ``nodule``.
        size: ``small``/``large`` when ``nodule``.
        lesion: where the nodule is drawn, when ``nodule``.
        template: which caption template (taken modulo the number of templates).
        seed: the run's seed.
        image_size: side of the square image in pixels.
    """

    split: str
    index: int
    modality: str
    nodule: bool
    side: str | None
    size: str | None
    lesion: Lesion | None
    template: int
    seed: int
    image_size: int

    format = "jpg"

    @property
    def id(self) -> str:
        return f"{self.split}_{self.index:06d}"

    def pixels(self) -> np.ndarray:
        """The image as uint8 pixels."""
        rng = np.random.default_rng([self.seed, SPLIT_CODES[self.split], self.index])
        lesion_rng = np.random.default_rng([self.seed, SPLIT_CODES[self.split], self.index, 2])
        return render(self.modality, self.lesion, rng, lesion_rng, self.image_size)

    def render(self) -> ArrayImage:
        return ArrayImage(self.pixels(), self.format)

    @property
    def zone(self) -> str | None:
        """The lesion's height or depth in the organ, in the modality's words (see :data:`ZONES`)."""
        if self.lesion is None:
            return None
        split, before, after = ZONES[self.modality]
        return before if self.lesion.cy < split else after

    @property
    def diameter_mm(self) -> float | None:
        """The lesion's nominal diameter: whole millimetres, hundredths of a millimetre for histology."""
        if self.lesion is None:
            return None
        mm = 2 * self.lesion.r * MM_PER_UNIT[self.modality]
        return round(mm, 2) if self.modality == "histology" else float(round(mm))

    def caption(self) -> str:
        if not self.nodule:
            templates = NORMAL_TEMPLATES[self.modality]
            return templates[self.template % len(templates)]
        templates = FINDING_TEMPLATES[self.modality]
        return finding_caption(templates[self.template % len(templates)], self.diameter_mm, self.side, self.zone)

    def labels(self) -> list[str]:
        if not self.nodule:
            return [f"modality:{self.modality}", "finding:normal"]
        return [f"modality:{self.modality}", "finding:nodule", f"side:{self.side}", f"size:{self.size}"]


def make_samples(split: str, n: int, seed: int, image_size: int) -> list[DemoSample]:
    """The split's samples: modalities and nodule/normal exactly balanced, sides, sizes and places random.

    The lesion's place is drawn here (from its own generator per sample), not while rendering, so that the caption
    written in this process can say where it is.
    """
    rng = np.random.default_rng([seed, SPLIT_CODES[split], 1_000_003])
    modalities = rng.permutation(np.arange(n) % len(MODALITIES))
    nodules = rng.permutation(np.arange(n) % 2).astype(bool)
    sides = rng.integers(0, 2, n)
    sizes = rng.integers(0, 2, n)
    templates = rng.integers(0, 1 << 30, n)
    samples = []
    for i in range(n):
        modality, nodule = MODALITIES[modalities[i]], bool(nodules[i])
        side = ("left", "right")[sides[i]] if nodule else None
        size = ("small", "large")[sizes[i]] if nodule else None
        lesion = None
        if nodule:
            lesion = place_lesion(modality, side, size, np.random.default_rng([seed, SPLIT_CODES[split], i, 1]))
        samples.append(DemoSample(split, i, modality, nodule, side, size, lesion, int(templates[i]), seed, image_size))
    return samples


def read_records(splits: dict[str, list[DemoSample]]) -> Iterator[Record]:
    """One record per sample, splits in train, val, test order."""
    for split, samples in splits.items():
        for s in samples:
            meta = {"modality": s.modality, "cuis": [], "labels": s.labels(), "licence": LICENCE}
            meta.update({"finding": "nodule" if s.nodule else "normal", "side": s.side, "size": s.size})
            meta.update({"zone": s.zone, "diameter_mm": s.diameter_mm})
            yield Record(SOURCE, s.id, split, s.caption(), s, "medclip-prep demo", meta)


def export_zeroshot(samples: list[DemoSample], zeroshot_dir: Path) -> dict:
    """The test split as two zero-shot tasks: modality (4 classes) and nodule vs normal."""
    source = "medclip-prep demo"
    modality_dir = zeroshot_dir / "modality"
    by_modality = ((s.modality, s.id, s.pixels()) for s in samples)
    modality = write_task(modality_dir, "demo_modality", source, MODALITY_CLASSNAMES, MODALITY_TEMPLATES, by_modality)
    # Same images, second task: link the files instead of rendering and encoding them again.
    by_finding = (
        ("nodule" if s.nodule else "normal", s.id, modality_dir / s.modality / f"{s.id}.png") for s in samples
    )
    nodule = write_task(zeroshot_dir / "nodule", "demo_nodule", source, NODULE_CLASSNAMES, [], by_finding,
                        class_prompts=nodule_prompts())  # fmt: skip
    return {"modality": modality, "nodule": nodule}


def _earlier_demo(output: Path) -> dict | None:
    try:
        manifest = json.loads((output / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("converter", {}).get("name") == "demo" else None


def up_to_date(output: Path, converter_options: dict, options: WriteOptions) -> Summary | None:
    """The earlier demo in ``output`` if it is complete and was made with the same options, else ``None``.

    The demo is a pure function of its options (and :data:`GENERATOR_VERSION`), so re-running ``make demo`` keeps
    it. Completeness: manifest and sizes present, every listed shard there, no ``*.tmp``, tokenizer and zero-shot
    prompts written.
    """
    manifest = _earlier_demo(output)
    try:
        sizes = json.loads((output / "sizes.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if manifest is None:
        return None
    same = manifest["converter"] == {"name": "demo", "options": {**converter_options, **options.content_options()}}
    same = same and manifest.get("version") == package_version()
    files = [output / name for name in sizes] + [output / "tokenizer" / "tokenizer.json"]
    files += [
        output / "zeroshot" / task / "prompts.json" for task in ("modality", "nodule") if converter_options["n_test"]
    ]
    if not same or list(output.glob("*.tmp")) or not all(f.is_file() for f in files):
        return None
    counts = manifest["counts"]
    return Summary(output, counts["read"], counts["written"], counts["rejected"], manifest.get("rejected", {}))


def run(output: Path, counts: dict[str, int], image_size: int, options: WriteOptions) -> Summary:
    """Generate the demo dataset into ``output``.

    An identical earlier demo is kept as it is; a different earlier *demo* (other options or generator version) is
    replaced; any other earlier content is refused unless ``options.overwrite``, like for every converter.

    Args:
        output: output folder.
        counts: samples per split, ``{"train": 2000, "val": 200, "test": 400}``.
        image_size: image side in pixels.
        options: the common writer options (``seed`` seeds the generation).
    """
    converter_options = {"image_size": image_size, **{f"n_{k}": v for k, v in counts.items()}}
    converter_options["generator_version"] = GENERATOR_VERSION
    if not options.overwrite:
        if (done := up_to_date(output, converter_options, options)) is not None:
            _note(options, f"{output} already holds this demo (same options), kept")
            return done
        if _earlier_demo(output) is not None:
            _note(options, f"replacing the different demo in {output}")
            options = dataclasses.replace(options, overwrite=True)
    splits = {split: make_samples(split, n, options.seed, image_size) for split, n in counts.items()}

    def finalize(out: Path) -> dict:
        vocab = train_wordpiece((s.caption() for s in splits.get("train", [])), out / "tokenizer")
        # No test images, no zero-shot task: a prompts.json naming no class would only fail the evaluation later.
        zeroshot = export_zeroshot(splits["test"], out / "zeroshot") if splits.get("test") else {}
        return {"tokenizer": {"path": "tokenizer", "vocab_size": vocab}, "zeroshot": zeroshot}

    total = sum(counts.values())
    return write_dataset(read_records(splits), output, options, "demo", converter_options, total, finalize)


def _note(options: WriteOptions, message: str) -> None:
    if not options.quiet:
        print(f"medclip-prep: {message}", file=sys.stderr)
