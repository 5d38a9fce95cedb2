"""Fixtures of the evaluator tests: a tiny untrained CLIP, tiny image folders and shards, all built on the fly."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="session")
def eval_tokenizer_dir(tiny_tokenizer_dir) -> Path:
    """The suite's shared WordPiece tokenizer (``tests/conftest.py``), under the name these tests use."""
    return tiny_tokenizer_dir


@pytest.fixture(scope="session")
def tiny_clip(eval_tokenizer_dir):
    """The ``tiny`` preset, untrained (seeded), in eval mode: ``model``, ``tokenizer``, ``preprocess``, ``name``."""
    import open_clip

    from medclip_train.config import ModelConfig
    from medclip_train.model.factory import build_model

    torch.manual_seed(0)
    built = build_model(ModelConfig(preset="tiny", tokenizer=str(eval_tokenizer_dir)))
    preprocess = open_clip.transform.image_transform_v2(
        open_clip.transform.PreprocessCfg(**built.preprocess_cfg), is_train=False
    )
    return SimpleNamespace(model=built.model.eval(), tokenizer=built.tokenizer, preprocess=preprocess, name="tiny")


# The suite tests' BreastMNIST catalog entry (the real slice in tests/fixtures/realdata, in the shipped catalog's form).
BREASTMNIST_ENTRY = {
    "name": "breastmnist",
    "layout": "medmnist_npz",
    "path": "medmnist/breastmnist.npz",
    "classes": ["malignant", "normal_benign"],
    "prompts": "medmnist_breastmnist",
    "modality": "ultrasound",
}


def random_image(rng: np.random.Generator, tint: int, size: int = 24) -> Image.Image:
    """A noisy image whose mean colour depends on ``tint``, so classes differ a little."""
    base = np.zeros((size, size, 3), dtype=np.float32)
    base[..., tint % 3] = 160
    pixels = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def write_image_folder(root: Path, classes: list[str], per_class: int = 4, seed: int = 0, prompts: dict | None = None):
    rng = np.random.default_rng(seed)
    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            random_image(rng, index).save(root / name / f"{name}_{i}.png")
    if prompts is not None:
        (root / "prompts.json").write_text(json.dumps(prompts))
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """``task/<class>/*.png`` with 3 classes x 4 images and a ``prompts.json``."""
    prompts = {
        "name": "colours",
        "source": "test fixture",
        "classnames": {"red": "red", "green": "green", "blue": "blue"},
        "templates": ["a photo of {c}.", "a {c} image."],
    }
    return write_image_folder(tmp_path / "colours", ["red", "green", "blue"], prompts=prompts)


CAPTIONS = [
    "a chest x-ray showing pneumonia",
    "a normal chest radiograph",
    "histopathology image of lymph node tissue",
    "an MRI of the brain",
    "a CT scan of the abdomen",
    "an ultrasound image",
    "skin lesion consistent with melanoma",
    "fundus photograph",
    "the lungs are clear",
    "mild cardiomegaly",
]
MODALITIES = ["xray", "xray", "histology", "mri", "ct", "ultrasound", "dermoscopy", "fundus", "xray", "xray"]


def write_project_shards(root: Path, n: int = 10, per_shard: int = 4, split: str = "test", seed: int = 0) -> str:
    """``{split}-NNNNNN.tar`` shards with ``key.png|jpg``, ``key.txt`` and ``key.json`` labels; returns a glob."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for shard in range((n + per_shard - 1) // per_shard):
        with wds.TarWriter(str(root / f"{split}-{shard:06d}.tar")) as writer:
            for i in range(shard * per_shard, min(n, (shard + 1) * per_shard)):
                ext = "png" if i % 2 else "jpg"
                buf = io.BytesIO()
                random_image(rng, i).save(buf, format="PNG" if ext == "png" else "JPEG")
                labels = [f"modality:{MODALITIES[i % len(MODALITIES)]}", f"finding:f{i % 3}"]
                writer.write(
                    {
                        "__key__": f"s{i:04d}",
                        ext: buf.getvalue(),
                        "txt": CAPTIONS[i % len(CAPTIONS)],
                        "json": {"labels": labels},
                    }
                )
    return str(root / f"{split}-*.tar")


@pytest.fixture
def project_shards(tmp_path) -> str:
    return write_project_shards(tmp_path / "shards")
