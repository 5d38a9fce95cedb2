"""The evaluators' loader path: uint8 pixels from the workers (greyscale resized as it is), normalised per batch, give
the bits of open_clip's float transform applied image by image."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets.folder import pil_loader

from medclip_train.evaluation.datasets import ImageFolderSource, load_image
from medclip_train.evaluation.features import Encoder, loader_workers, normalize_batch, pixel_transform


def smooth(size: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[:h, :w] / max(h, w)
    field = 120 + 70 * np.sin(7 * xx + 3 * yy + seed) + rng.normal(0, 6, (h, w))
    return np.clip(field, 0, 255).astype(np.uint8)


def write_images(folder) -> list:
    """Every mode and size case: L, RGB, P, LA, RGBA, I;16 PNG; L and RGB JPEG; smaller than the crop; non-square."""
    folder.mkdir(parents=True)
    grey = smooth((300, 260), 0)
    rgb = np.stack([smooth((256, 384), s) for s in (1, 2, 3)], axis=-1)
    images = {
        "grey.png": Image.fromarray(grey),
        "grey.jpg": Image.fromarray(grey),
        "rgb.png": Image.fromarray(rgb),
        "rgb.jpg": Image.fromarray(rgb),
        "palette.png": Image.fromarray(rgb).convert("P"),
        "grey_alpha.png": Image.fromarray(grey).convert("LA"),
        "rgba.png": Image.fromarray(rgb).convert("RGBA"),
        "small_grey.png": Image.fromarray(smooth((100, 140), 4)),
        "deep.png": Image.fromarray(grey.astype(np.uint16) * 257),
    }
    for name, image in images.items():
        image.save(folder / name)
    return [folder / name for name in images]


@pytest.mark.parametrize("size", [160, 224])
def test_pixels_normalised_per_batch_are_the_float_transforms_bits(tmp_path, size):
    import open_clip

    from medclip_train.presets import OPENAI_MEAN, OPENAI_STD

    cfg = open_clip.transform.PreprocessCfg(size=size, mean=OPENAI_MEAN, std=OPENAI_STD, interpolation="bicubic")
    preprocess = open_clip.transform.image_transform_v2(cfg, is_train=False)
    pixels = pixel_transform(preprocess)
    assert pixels is not None and pixels.keeps_grey
    files = write_images(tmp_path / "images")
    assert Image.open(files[0]).mode == "L" and load_image(files[0]).mode == "L"  # resized as greyscale
    assert [type(s).__name__ for s in pixels.steps] == ["Resize", "CenterCrop"]  # made RGB at the very end
    assert pixels(load_image(files[0])).stride(0) == 0  # the grey plane shared by the three channels until stacked
    theirs = torch.stack([preprocess(pil_loader(str(f))) for f in files])
    batch = torch.stack([pixels(load_image(f)) for f in files])
    assert batch.dtype == torch.uint8 and batch.shape == (len(files), 3, size, size)
    assert torch.equal(normalize_batch(batch, pixels.mean, pixels.std), theirs)


def test_an_unknown_transform_runs_as_it_is(tiny_clip):
    from torchvision import transforms

    custom = transforms.Compose([transforms.Lambda(lambda im: im.rotate(90)), *tiny_clip.preprocess.transforms[-2:]])
    assert pixel_transform(custom) is None
    assert pixel_transform(transforms.Compose([transforms.ToTensor()])) is None


def test_encoder_features_equal_the_models_on_the_float_transform(tmp_path, tiny_clip):
    files = write_images(tmp_path / "task" / "mixed")
    source = ImageFolderSource(tmp_path / "task")
    encoded = Encoder(tiny_clip.model, tiny_clip.tokenizer, tiny_clip.preprocess, batch_size=len(files)).images(source)
    batch = torch.stack([tiny_clip.preprocess(pil_loader(str(f))) for f, _ in source.samples])
    with torch.no_grad():
        theirs = tiny_clip.model.encode_image(batch, normalize=True)
    assert torch.equal(encoded.features, theirs)


def test_loader_workers_are_not_started_for_one_batch_nor_beyond_batches_or_shards():
    assert loader_workers(2, 64, 64) == 0  # one batch: the main process decodes it sooner than a worker starts
    assert loader_workers(8, 65, 64) == 2
    assert loader_workers(2, 10_000, 64) == 2
    assert loader_workers(4, None, 64, shards=3) == 3
