"""Zero-shot evaluation folders: ``<task>/<class>/*.png`` plus ``<task>/prompts.json``.

``prompts.json`` follows the CLIP_benchmark convention (``{c}`` is the class placeholder)::

    {"name": "demo_modality", "source": "medclip-prep demo",
     "classnames": {"<folder>": "<display name>", ...},
     "templates": ["a {c}.", "an image of {c}.", ...],
     "class_prompts": {"<folder>": ["a full prompt", ...]}}   # optional: replaces the templates for that class

``classnames`` lists only folders that hold images, sorted by folder name: the order torchvision's ``ImageFolder``
gives class indices in (and it refuses empty class folders).
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep.writer import atomic_write_json


def write_task(
    task_dir: Path,
    name: str,
    source: str,
    classnames: dict[str, str],
    templates: list[str],
    images: Iterable[tuple[str, str, np.ndarray | Path]],
    note: str | None = None,
    class_prompts: dict[str, list[str]] | None = None,
) -> dict[str, int]:
    """Write one zero-shot task folder.

    Args:
        task_dir: the task's folder (``OUT/zeroshot/<task>``).
        name: task name for ``prompts.json``.
        source: what produced it.
        classnames: display name by class folder (phrased like the training captions).
        templates: prompt templates with ``{c}``.
        images: ``(class folder, file stem, image)`` triples; the image is uint8 pixels, or the path of a PNG
            already written for another task (hard-linked, or copied where links are not possible).
        note: free text kept in ``prompts.json`` (e.g. which images were left out and why).
        class_prompts: full prompts of a class, used instead of the templates for that class (CuPL-style).

    Returns:
        Image count per class folder.
    """
    counts: Counter[str] = Counter()
    for folder, stem, image in images:
        (task_dir / folder).mkdir(parents=True, exist_ok=True)
        _save(image, task_dir / folder / f"{stem}.png")
        counts[folder] += 1
    prompts = {
        "name": name,
        "source": source,
        "classnames": {folder: classnames[folder] for folder in sorted(counts)},
        "templates": list(templates),
    }
    if class_prompts:
        prompts["class_prompts"] = {
            folder: list(class_prompts[folder]) for folder in sorted(counts) if folder in class_prompts
        }
    if note:
        prompts["note"] = note
    atomic_write_json(task_dir / "prompts.json", prompts)
    return dict(sorted(counts.items()))


def _save(image: np.ndarray | Path, path: Path) -> None:
    if isinstance(image, Path):
        try:
            os.link(image, path)
        except OSError:
            shutil.copyfile(image, path)
        return
    # Fast PNG compression: evaluation images are written once and read a few times.
    Image.fromarray(np.ascontiguousarray(image)).save(path, compress_level=1)
