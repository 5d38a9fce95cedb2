"""Text-overlay bias probe of ``medclip-eval suite``: does text burnt into an image move the model?

Medical images often carry burnt-in annotations. A CLIP model that reads them instead of the anatomy is fooled by a
caption: here each image gets a caption-like string in its bottom-left corner, either the name of another class
(image of class c: class (c + 1) mod C, the name the prompts use) or a neutral string, and is encoded again. Per
variant: zero-shot top-1 clean and with the overlay (and the drop), the mean cosine shift ``1 - cos(clean, overlay)``
of the image features, the share of predictions that changed, and (other-class variant) the share that changed to
the written class.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset, IterableDataset

from medclip_train.evaluation.metrics import classification_chance

NEUTRAL_TEXT = "scan 2019"
VARIANTS = ("other_class", "neutral")
VARIANT_NAMES = {"other_class": "other class", "neutral": f'neutral "{NEUTRAL_TEXT}"'}


def font_size(image: Image.Image) -> int:
    """About 8% of the shorter side (18 px on 224 px), at least 8 px so that a 28 px MedMNIST image gets text."""
    return max(8, round(0.08 * min(image.size)))


def text_box(image: Image.Image, text: str) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the text as :func:`burn_text` draws it, clipped to the image."""
    size = font_size(image)
    font = ImageFont.load_default(size=size)
    margin, stroke = max(1, size // 4), max(1, size // 8)
    left, top, right, bottom = ImageDraw.Draw(image).textbbox((0, 0), text, font=font, stroke_width=stroke)
    x, y = margin - left, image.height - margin - bottom  # the text's box starts at the margin, ends above it
    width, height = image.size
    return max(0, x + left), max(0, y + top), min(width, x + right), min(height, y + bottom)


def burn_text(image: Image.Image, text: str) -> Image.Image:
    """A copy of ``image`` (as RGB) with ``text`` in its bottom-left corner: white, outlined in black (legible on any
    background, as scanner annotations are), in PIL's default font scaled to the image."""
    out = image.convert("RGB")
    out = out.copy() if out is image else out
    size = font_size(out)
    font = ImageFont.load_default(size=size)
    margin, stroke = max(1, size // 4), max(1, size // 8)
    draw = ImageDraw.Draw(out)
    left, _, _, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
    position = (margin - left, out.height - margin - bottom)
    draw.text(position, text, fill="white", font=font, stroke_width=stroke, stroke_fill="black")
    return out


# ---------------------------------------------------------------------------------------------------------- sources


def _as_is(image):
    return image  # the inner dataset's "transform": keep the decoded PIL image for the overlay


class OverlaySource:
    """``source`` with text burnt into every image before ``transform``: ``texts[key]``, else ``default``."""

    def __init__(self, source, texts: dict[str, str] | None = None, default: str | None = None, variant: str = ""):
        self.source, self.texts, self.default, self.variant = source, texts or {}, default, variant
        self.kind = source.kind
        self.urls = getattr(source, "urls", None)  # shards: read (and split over ranks) as the source's are

    def fingerprint(self) -> list:
        texts = hashlib.sha256(json.dumps([self.texts, self.default], sort_keys=True).encode()).hexdigest()
        return [*self.source.fingerprint(), "overlay", self.variant, texts]

    def torch_dataset(self, transform, **options):
        inner = self.source.torch_dataset(_as_is, **options)
        draw = _Overlay(self.texts, self.default, transform)
        if isinstance(inner, Dataset) and hasattr(inner, "__len__") and not isinstance(inner, IterableDataset):
            return _OverlayMap(inner, draw)
        return _OverlayIterable(inner, draw)


class _Overlay:
    def __init__(self, texts: dict[str, str], default: str | None, transform):
        self.texts, self.default, self.transform = texts, default, transform

    def __call__(self, item):
        image, key, meta, *position = item
        text = self.texts.get(key, self.default)
        return self.transform(burn_text(image, text) if text else image.convert("RGB")), key, meta, *position


class _OverlayMap(Dataset):
    def __init__(self, inner: Dataset, draw: _Overlay):
        self.inner, self.draw = inner, draw

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i):
        return self.draw(self.inner[i])


class _OverlayIterable(IterableDataset):
    def __init__(self, inner, draw: _Overlay):
        self.inner, self.draw = inner, draw

    def __iter__(self):
        return map(self.draw, iter(self.inner))  # the inner pipeline splits shards over workers itself


# ---------------------------------------------------------------------------------------------------------- probe


def overlay_sources(data, clean, labelled, classnames: list[str]) -> dict[str, OverlaySource]:
    """The two variants of ``data.source``: image i of class c gets ``classnames[(c + 1) % C]``, or the neutral text."""
    written = (np.asarray(labelled.targets) + 1) % len(classnames)
    keys = [clean.keys[i] for i in labelled.indices]
    return {
        "other_class": OverlaySource(data.source, {k: classnames[w] for k, w in zip(keys, written)}, None, "other"),
        "neutral": OverlaySource(data.source, None, NEUTRAL_TEXT, "neutral"),
    }


def overlay_probe(
    encoder, data, clean, labelled, classifier: torch.Tensor, classnames: list[str], max_samples: int | None = None
) -> dict:
    """Both overlay variants against the clean features of the same images.

    Args:
        encoder: the suite's :class:`~medclip_train.evaluation.features.Encoder` (overlay features are cached too).
        data: the dataset (its ``source`` is re-read with the overlay).
        clean: the clean :class:`~medclip_train.evaluation.features.EncodedImages`.
        labelled: single-label targets of ``clean`` (``data.targets(clean.metas)``).
        classifier: (D, C) zero-shot class embeddings, on CPU.
        classnames: the names written for the other-class variant: those the prompts put into their templates.
    """
    index = torch.as_tensor(labelled.indices)
    targets = np.asarray(labelled.targets)
    written = (targets + 1) % len(classnames)
    keys = [clean.keys[i] for i in labelled.indices]
    clean_features = clean.features[index]
    clean_pred = (clean_features @ classifier).argmax(1).numpy()
    clean_top1 = float((clean_pred == targets).mean())
    sources = overlay_sources(data, clean, labelled, classnames)
    out = {"chance": {"top1": classification_chance(targets, len(classnames))["top1"]}}
    for variant, source in sources.items():
        encoded = encoder.images(source, max_samples, desc=f"overlay {variant}", kind="overlay")
        row = {key: i for i, key in enumerate(encoded.keys)}
        features = encoded.features[torch.as_tensor([row[k] for k in keys])]
        pred = (features @ classifier).argmax(1).numpy()
        top1 = float((pred == targets).mean())
        flipped = pred != clean_pred
        result = {
            "top1_clean": clean_top1,
            "top1": top1,
            "top1_drop": clean_top1 - top1,
            "cosine_shift": float((1 - (clean_features * features).sum(1)).mean()),
            "flipped": float(flipped.mean()),
        }
        if variant == "other_class":
            result["flipped_to_written"] = float((flipped & (pred == written)).mean())
        out[variant] = result
    return out
