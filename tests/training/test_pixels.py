"""uint8 pixels from the loader + normalisation on the device == open_clip's float transform."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

from medclip_train.data.datamodule import WebDataModule
from medclip_train.data.decode import decode_image
from medclip_train.data.pixels import normalize_pixels, pixels_transform
from tests.shardkit import make_shards, shard_pattern
from tests.training.test_datamodule import PREPROCESS, tokenizer  # noqa: F401 (fixture)

FIGURES = Path(__file__).parents[1] / "fixtures/realdata/medicat/figures"


@pytest.mark.parametrize("figure", sorted(FIGURES.glob("*.png"))[:3], ids=lambda p: p.name[:12])
def test_uint8_then_normalize_equals_open_clip_transform(figure):
    """A real MedICaT figure through open_clip's eval transform (deterministic) both ways."""
    cfg = PreprocessCfg(size=224, interpolation="bicubic", resize_mode="shortest")
    theirs = image_transform_v2(cfg, is_train=False)
    image = Image.open(figure).convert("RGB")
    pixels = pixels_transform(theirs)(image)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 224, 224)
    ours = normalize_pixels(pixels[None], cfg.mean, cfg.std)[0]
    assert torch.allclose(ours, theirs(image), atol=1e-5)


def test_float_images_pass_unchanged():
    images = torch.randn(2, 3, 8, 8)
    assert normalize_pixels(images, (0.5,) * 3, (0.5,) * 3) is images


def test_unexpected_transform_tail_is_refused():
    from torchvision import transforms

    with pytest.raises(ValueError, match="ToTensor, Normalize"):
        pixels_transform(transforms.Compose([transforms.CenterCrop(8)]))


def test_loader_batches_normalise_to_open_clip_float_pipeline(tmp_path, tokenizer):  # noqa: F811
    """Square shard images and crop scale 1: the train crop is the whole image, so the normalised batch must equal
    open_clip's float transform of the same decoded bytes."""
    paths = make_shards(tmp_path, [4], image_size=64)
    dm = WebDataModule(train=shard_pattern(paths), batch_size=4, num_workers=0, shuffle_buffer=0, train_scale=(1, 1))
    dm.connect(tokenizer, PREPROCESS)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 3, 32, 32)
    with tarfile.open(paths[0]) as tf:
        jpgs = {Path(m.name).stem: tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".jpg")}
    reference = image_transform_v2(PreprocessCfg(**PREPROCESS), is_train=False)
    expected = torch.stack([reference(decode_image(jpgs[key], 32)) for key in batch["key"]])
    got = normalize_pixels(batch["image"], PREPROCESS["mean"], PREPROCESS["std"])
    assert torch.allclose(got, expected, atol=1e-5)
