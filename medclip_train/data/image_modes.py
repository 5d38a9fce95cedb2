"""Any PIL image mode to 8-bit pixels: wide grey windowed by its real range, alpha composited on white.

One conversion for both ends of the pipeline: medclip-prep writes shards with it (:func:`to_8bit`, which keeps grey
as ``L``) and the training loader decodes with it (:func:`to_rgb`), so an image that reaches training without
medclip-prep (a user's own shards, a 16-bit PNG) comes out as it would have been written.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Modes whose pixels are wider than 8 bits: windowed by their real range, see to_8bit().
WIDE_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}


def window_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map an array's real min..max range onto 0..255.

    16-bit medical images rarely use the full 0..65535 range (a 12-bit CT stores 0..4095): dividing by 256 would leave
    them nearly black, so the window is the data's own range.
    """
    values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def to_8bit(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit ``RGB`` or ``L``, the two modes every JPEG decoder and trainer handles.

    Grey stays grey (``L``), wide grey is windowed (see :func:`window_to_uint8`), palettes are expanded, alpha is
    composited on white (figures with transparency are drawn for a white page), CMYK (Adobe-inverted included, which
    PIL handles) becomes RGB.
    """
    mode = im.mode
    if mode in ("RGB", "L") and "transparency" not in im.info:
        return im
    if mode in WIDE_MODES:
        return Image.fromarray(window_to_uint8(np.asarray(im)))
    if mode == "1":
        return im.convert("L")
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info or im.palette.mode == "RGBA"
        im = im.convert("RGBA" if has_alpha else "RGB")
        return _composite_on_white(im) if has_alpha else im
    if "transparency" in im.info and mode in ("L", "RGB"):
        # A PNG tRNS chunk marks one grey level or colour as transparent.
        return _composite_on_white(im.convert("LA" if mode == "L" else "RGBA"))
    if mode in ("RGBA", "LA", "RGBa", "La"):
        return _composite_on_white(im)
    return im.convert("RGB")


def _composite_on_white(im: Image.Image) -> Image.Image:
    grey = im.mode in ("LA", "La")
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    background.alpha_composite(rgba)
    return background.convert("L" if grey else "RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit ``RGB`` from any mode: :func:`to_8bit`, then grey to RGB."""
    im = to_8bit(im)
    return im if im.mode == "RGB" else im.convert("RGB")
