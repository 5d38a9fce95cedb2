"""The demo dataset: generated, never downloaded (``medclip-prep demo --output DIR``).

Four modalities (chest x-ray, chest CT, brain MRI, H&E histology), half of the images with a nodule or focal lesion
(left or right, small or large), clinical-style captions from several templates per modality, and::

    DIR/{train,val,test}-NNNNNN.tar, sizes.json, manifest.json, rejected.jsonl   as for every converter
    DIR/tokenizer/                       WordPiece tokenizer trained on the train captions
    DIR/zeroshot/modality/<class>/*.png  test split by modality (xray, ct, mri, histology) + prompts.json
    DIR/zeroshot/nodule/<class>/*.png    test split by finding (nodule, normal) + prompts.json

Each image is drawn from its own random generator seeded by ``(seed, split, index)``, so the output is the same for a
seed whatever the number of workers.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.demo_images import MODALITIES, render
from data_prep.images import ArrayImage
from data_prep.records import Record
from data_prep.tokenizer import train_wordpiece
from data_prep.writer import Summary, WriteOptions, package_version, write_dataset
from data_prep.zeroshot import write_task

SOURCE = "demo"
LICENCE = "CC0-1.0"
# Bump when images, captions or the tokenizer change: an existing demo made by another version is then regenerated.
GENERATOR_VERSION = 2
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

FINDING_TEMPLATES = {
    "xray": (
        "Chest radiograph showing a {size} nodule in the {side} lung.",
        "Frontal chest x-ray with a {size} pulmonary nodule in the {side} lung.",
        "PA chest x-ray demonstrating a {size} {side} lung nodule.",
    ),
    "ct": (
        "Axial CT slice showing a {size} nodule in the {side} lung.",
        "Chest CT scan, axial view, with a {size} pulmonary nodule in the {side} lung.",
        "CT image of the chest demonstrating a {size} {side} lung nodule.",
    ),
    "mri": (
        "Axial brain MRI showing a {size} lesion in the {side} hemisphere.",
        "T2-weighted MRI of the brain with a {size} hyperintense nodule in the {side} hemisphere.",
        "Brain MRI demonstrating a {size} focal lesion in the {side} hemisphere.",
    ),
    "histology": (
        "H&E stained histology section showing a {size} nodule of atypical cells on the {side} side.",
        "Histopathology slide, H&E stain, with a {size} cluster of atypical nuclei on the {side} side.",
        "H&E micrograph demonstrating a {size} focal lesion on the {side} side of the section.",
    ),
}
NORMAL_TEMPLATES = {
    "xray": (
        "Chest radiograph with no focal lesion.",
        "Frontal chest x-ray, lungs clear, no nodule.",
        "Normal PA chest x-ray without pulmonary nodules.",
    ),
    "ct": (
        "Axial CT slice with no focal lesion.",
        "Chest CT scan, axial view, lungs clear, no nodule.",
        "Normal CT image of the chest without nodules.",
    ),
    "mri": (
        "Axial brain MRI with no focal lesion.",
        "T2-weighted MRI of the brain, no lesion.",
        "Normal brain MRI without focal abnormality.",
    ),
    "histology": (
        "H&E stained histology section with normal tissue architecture and no focal lesion.",
        "Histopathology slide, H&E stain, showing normal tissue without atypical cells.",
        "Normal H&E micrograph, no lesion.",
    ),
}

# Zero-shot prompts phrased like the captions above.
MODALITY_CLASSNAMES = {
    "xray": "chest x-ray",
    "ct": "chest ct scan",
    "mri": "brain mri",
    "histology": "h&e stained histology section",
}
MODALITY_TEMPLATES = ["a {c}.", "an image of a {c}.", "a {c} image.", "{c}."]
NODULE_CLASSNAMES = {"nodule": "a nodule", "normal": "no focal lesion"}
NODULE_TEMPLATES = ["an image showing {c}.", "a medical image with {c}.", "a scan with {c}.", "{c}."]


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
        return render(self.modality, self.nodule, self.side, self.size, rng, self.image_size)

    def render(self) -> ArrayImage:
        return ArrayImage(self.pixels(), self.format)

    def caption(self) -> str:
        if not self.nodule:
            templates = NORMAL_TEMPLATES[self.modality]
            return templates[self.template % len(templates)]
        templates = FINDING_TEMPLATES[self.modality]
        return templates[self.template % len(templates)].format(size=self.size, side=self.side)

    def labels(self) -> list[str]:
        if not self.nodule:
            return [f"modality:{self.modality}", "finding:normal"]
        return [f"modality:{self.modality}", "finding:nodule", f"side:{self.side}", f"size:{self.size}"]


def make_samples(split: str, n: int, seed: int, image_size: int) -> list[DemoSample]:
    """The split's samples: modalities and nodule/normal exactly balanced, sides and sizes random."""
    rng = np.random.default_rng([seed, SPLIT_CODES[split], 1_000_003])
    modalities = rng.permutation(np.arange(n) % len(MODALITIES))
    nodules = rng.permutation(np.arange(n) % 2).astype(bool)
    sides = rng.integers(0, 2, n)
    sizes = rng.integers(0, 2, n)
    templates = rng.integers(0, 1 << 30, n)
    return [
        DemoSample(
            split,
            i,
            MODALITIES[modalities[i]],
            bool(nodules[i]),
            ("left", "right")[sides[i]] if nodules[i] else None,
            ("small", "large")[sizes[i]] if nodules[i] else None,
            int(templates[i]),
            seed,
            image_size,
        )
        for i in range(n)
    ]


def read_records(splits: dict[str, list[DemoSample]]) -> Iterator[Record]:
    """One record per sample, splits in train, val, test order."""
    for split, samples in splits.items():
        for s in samples:
            meta = {"modality": s.modality, "cuis": [], "labels": s.labels(), "licence": LICENCE}
            meta.update({"finding": "nodule" if s.nodule else "normal", "side": s.side, "size": s.size})
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
    nodule = write_task(zeroshot_dir / "nodule", "demo_nodule", source, NODULE_CLASSNAMES, NODULE_TEMPLATES, by_finding)
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
