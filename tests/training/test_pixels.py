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
from tests.training.test_datamodule import PREPROCESS

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


def test_fast_random_resized_crop_gives_torchvision_pixels_and_crop_bounds():
    """RandomResizedCropPIL: for its drawn parameters the pixels are torchvision's ``F.resized_crop`` of them, and
    every crop keeps RandomResizedCrop's area and aspect bounds; pixels_transform puts it in place of the original."""
    from open_clip.transform import AugmentationCfg
    from torchvision.transforms import RandomResizedCrop
    from torchvision.transforms import functional as F

    from medclip_train.data.pixels import RandomResizedCropPIL

    cfg = PreprocessCfg(size=64, interpolation="bicubic", resize_mode="shortest")
    train = pixels_transform(image_transform_v2(cfg, is_train=True, aug_cfg=AugmentationCfg(scale=(0.5, 1.0))))
    crop = train.transforms[0]
    assert isinstance(crop, RandomResizedCropPIL) and crop.scale == (0.5, 1.0) and crop.size == (64, 64)

    reference = RandomResizedCrop(64, scale=(0.5, 1.0), interpolation=F.InterpolationMode.BICUBIC)
    image = Image.fromarray(torch.randint(0, 256, (90, 120, 3), dtype=torch.uint8).numpy())
    torch.manual_seed(0)
    for _ in range(50):
        state = torch.get_rng_state()
        top, left, h, w = crop.get_params(*image.size)
        assert 0.5 * 90 * 120 * 0.9 <= h * w <= 90 * 120 and 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
        assert 0 <= top <= 90 - h and 0 <= left <= 120 - w
        torch.set_rng_state(state)  # the same draw again, through forward
        expected = F.resized_crop(image, top, left, h, w, [64, 64], reference.interpolation)
        assert crop(image).tobytes() == expected.tobytes()
    # An image no crop of the ratio range fits into (a thin strip) gets torchvision's central fallback crop.
    strip = Image.new("RGB", (200, 4))
    assert crop.get_params(*strip.size) == reference.get_params(strip, list(reference.scale), list(reference.ratio))


def test_stack_pixels_equals_torch_stack_in_and_out_of_a_worker():
    from torch.utils.data import DataLoader, IterableDataset

    from medclip_train.data.pixels import stack_pixels

    images = [torch.randint(0, 256, (20, 30, 3), dtype=torch.uint8).permute(2, 0, 1) for _ in range(5)]
    assert torch.equal(stack_pixels(images), torch.stack(images))

    class Batches(IterableDataset):
        def __iter__(self):
            yield {"stacked": stack_pixels(images), "expected": torch.stack(images)}

    batch = next(iter(DataLoader(Batches(), batch_size=None, num_workers=1)))
    assert torch.equal(batch["stacked"], batch["expected"]) and batch["stacked"].is_contiguous()


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_stack_pixels_of_pil_images_equals_stacked_pil_to_tensor_in_and_out_of_a_worker(mode):
    """The training stream hands stack_pixels PIL images: one copy each into the batch, the same pixels as
    torch.stack of torchvision's PILToTensor, also into a worker's shared memory."""
    from torch.utils.data import DataLoader, IterableDataset
    from torchvision.transforms import PILToTensor

    from medclip_train.data.pixels import stack_pixels

    gen = torch.Generator().manual_seed(0)
    images = [
        Image.fromarray(torch.randint(0, 256, (20, 30, 3), dtype=torch.uint8, generator=gen).numpy()).convert(mode)
        for _ in range(5)
    ]
    expected = torch.stack([PILToTensor()(im) for im in images])
    got = stack_pixels(images)
    assert got.dtype == torch.uint8 and got.shape == expected.shape and torch.equal(got, expected)

    class Batches(IterableDataset):
        def __iter__(self):
            yield {"stacked": stack_pixels(images), "shared": stack_pixels(images).is_shared()}

    batch = next(iter(DataLoader(Batches(), batch_size=None, num_workers=1)))
    assert torch.equal(batch["stacked"], expected) and batch["stacked"].is_contiguous() and batch["shared"]


def test_pil_output_transform_gives_the_tensor_transforms_pixels():
    """pixels_transform(tensor=False) + stack_pixels == pixels_transform() + torch.stack, random crops included."""
    from open_clip.transform import AugmentationCfg

    from medclip_train.data.pixels import stack_pixels

    cfg = PreprocessCfg(size=48, interpolation="bicubic", resize_mode="shortest")
    train = image_transform_v2(cfg, is_train=True, aug_cfg=AugmentationCfg(scale=(0.3, 1.0)))
    gen = torch.Generator().manual_seed(1)
    images = [Image.fromarray(torch.randint(0, 256, (70, 90, 3), dtype=torch.uint8, generator=gen).numpy())] * 6
    state = torch.get_rng_state()
    expected = torch.stack([pixels_transform(train)(im) for im in images])
    torch.set_rng_state(state)
    pils = [pixels_transform(train, tensor=False)(im) for im in images]
    assert all(isinstance(p, Image.Image) for p in pils)
    assert torch.equal(stack_pixels(pils), expected)


@pytest.mark.parametrize("strip_sep", [False, True])
def test_tokenize_gives_open_clips_ids(tokenizer, strip_sep):  # noqa: F811
    """The batch tokenizer of the loader == open_clip's HFTokenizer, truncation and sep stripping included."""
    from medclip_train.data.decode import tokenize

    tokenizer.strip_sep_token = strip_sep
    captions = ["A  chest x-ray\nshows a nodule.", "short", " ".join(["effusion"] * 200), "CT  scan; left lobe (3 mm)."]
    captions += [
        "épanchement pleural, “curly” quotes\u00a0and ＦＵＬＬＷＩＤＴＨ",  # non-ASCII: ftfy's path
        "âœ” mojibake &amp; entities &lt;b&gt; &amp;amp;",
        "tabs\tand\r\nCRLF  line\rbreaks",
        "control\x0bchars\x1fand\x7fDEL\x00",
        "",
        " \t ",
        "[SEP] [CLS] special tokens as text",
    ]
    expected = tokenizer(captions)
    got = tokenize(tokenizer, captions)
    assert got.dtype == expected.dtype == torch.int64 and torch.equal(got, expected)


def test_plain_ascii_cleaning_is_open_clips():
    """The tokenizer's shortcut past ftfy for plain ASCII gives open_clip's whitespace cleaning, on random ASCII
    (control characters, entities and line breaks included) and on every single character."""
    import random

    from open_clip.tokenizer import get_clean_fn

    from medclip_train.data.decode import _clean

    reference = get_clean_fn("whitespace")
    rng = random.Random(0)
    alphabet = [chr(i) for i in range(128)] + ["&amp;", "&lt;", "&#39;", "\r\n", "  ", "é", "\u2028"]
    texts = [chr(i) for i in range(256)] + ["".join(rng.choices(alphabet, k=rng.randint(0, 40))) for _ in range(3000)]
    texts += ["".join(rng.choices(alphabet[32:127], k=rng.randint(0, 40))) for _ in range(2000)]  # mostly the fast path
    assert [_clean(t) for t in texts] == [reference(t) for t in texts]


def test_convert_mode_without_copy_gives_open_clips_pixels():
    from open_clip.transform import MaybeConvertMode

    from medclip_train.data.pixels import ConvertModePIL, _fast

    step = _fast(MaybeConvertMode("RGB"))
    assert isinstance(step, ConvertModePIL)
    rgb = Image.new("RGB", (9, 7), (10, 200, 30))
    assert step(rgb) is rgb, "no copy of an image already in the mode"
    for image in (rgb, rgb.convert("L"), rgb.convert("RGBA"), rgb.convert("P"), rgb.convert("CMYK")):
        got, expected = step(image), MaybeConvertMode("RGB")(image)
        assert got.mode == expected.mode == "RGB" and got.tobytes() == expected.tobytes()
    array = torch.zeros(3, 2, 2)
    assert step(array) is array
