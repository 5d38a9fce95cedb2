"""Text-overlay bias probe: the text lands in the corner only, and an encoder blind to the image is not moved."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from medclip_train.evaluation.datasets import open_classification
from medclip_train.evaluation.features import Encoder
from medclip_train.evaluation.overlay import NEUTRAL_TEXT, burn_text, overlay_probe
from medclip_train.evaluation.zeroshot import zero_shot_classifier


@pytest.mark.parametrize("size", [(224, 224), (28, 28), (300, 200)])
def test_the_text_changes_pixels_in_the_bottom_left_corner_only(size):
    rng = np.random.default_rng(0)
    clean = Image.fromarray(rng.integers(60, 200, (size[1], size[0], 3), dtype=np.uint8))
    burnt = burn_text(clean, "normal, benign")
    changed = (np.asarray(burnt).astype(int) != np.asarray(clean).astype(int)).any(axis=2)
    rows, cols = np.nonzero(changed)
    assert len(rows) > 0.005 * changed.size  # legible text, not a speck
    # A band at the bottom at most two font sizes high (font: 8% of the shorter side, at least 8 px), from the left.
    band = 2 * max(8, 0.08 * min(size))
    assert rows.min() >= size[1] - band and cols.min() <= 0.05 * size[0] + 2
    assert not changed[: size[1] // 2].any()  # the upper half, where the anatomy usually is, untouched
    assert np.asarray(clean).std() > 0 and burnt is not clean and burnt.size == clean.size


def test_a_longer_string_stays_in_the_band():
    clean = Image.new("L", (64, 64), 128)  # grey, one channel: the overlay returns RGB
    rows, _ = np.nonzero((np.asarray(burn_text(clean, "a very long caption that overflows")) != 128).any(axis=2))
    assert burn_text(clean, "x").mode == "RGB" and rows.min() >= 64 - 2 * 8


class ConstantImages(torch.nn.Module):
    """The tiny CLIP's text tower, but the same image feature for every image: a model blind to the pixels."""

    def __init__(self, clip: torch.nn.Module, dim: int):
        super().__init__()
        self.clip, self.dim = clip, dim

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return F.normalize(torch.arange(1.0, self.dim + 1).expand(len(images), -1), dim=-1)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.clip.encode_text(tokens, normalize=normalize)


def probe(model, tiny_clip, folder) -> dict:
    data = open_classification(folder)
    encoder = Encoder(model, tiny_clip.tokenizer, tiny_clip.preprocess, batch_size=8)
    clean = encoder.images(data.source)
    labelled = data.targets(clean.metas)
    classifier = zero_shot_classifier(model, tiny_clip.tokenizer, data.prompts)
    return overlay_probe(encoder, data, clean, labelled, classifier, data.prompts.classnames)


def test_an_encoder_blind_to_the_image_gives_no_shift_and_no_flips(tiny_clip, image_folder):
    dim = tiny_clip.model.encode_text(tiny_clip.tokenizer(["x"]), normalize=True).shape[1]
    blind = probe(ConstantImages(tiny_clip.model, dim).eval(), tiny_clip, image_folder)
    for variant in ("other_class", "neutral"):
        r = blind[variant]
        assert r["cosine_shift"] == pytest.approx(0.0, abs=1e-6) and r["flipped"] == 0.0
        assert r["top1"] == r["top1_clean"] and r["top1_drop"] == 0.0
    assert blind["other_class"]["flipped_to_written"] == 0.0
    assert blind["chance"]["top1"] == pytest.approx(1 / 3)  # 3 classes x 4 images
    seeing = probe(tiny_clip.model, tiny_clip, image_folder)  # the real (untrained) model sees the text
    assert seeing["neutral"]["cosine_shift"] > 1e-4 and seeing["other_class"]["cosine_shift"] > 1e-4
    assert 0 <= seeing["other_class"]["flipped_to_written"] <= seeing["other_class"]["flipped"] <= 1
    assert NEUTRAL_TEXT == "scan 2019"
