"""Procedural "medical-like" images for the demo dataset: chest x-ray, chest CT, brain MRI, H&E histology.

Each modality has its own layout and colour, so a tiny ViT separates them within an epoch; the finding (a nodule or
focal lesion, left or right, small or large) is a visible blob that takes a little longer to learn. Position,
intensity, shape and noise vary per image. Everything is numpy on a (size, size) grid in normalised coordinates
``[-1, 1]``; an image costs about a millisecond.

Side convention: for x-ray, CT and MRI, "right" is the patient's right, shown on the viewer's left as radiology
images are read; for histology there is no patient orientation and "right" is the right of the field of view.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

MODALITIES = ("xray", "ct", "mri", "histology")
# Nodule radius in normalised units: at 160 px about 19 and 32 px across, i.e. 1.2 and 2 of the tiny ViT's 16-px
# patches. Half that (one and two patches across, as in generator version 2) was not learned by the tiny preset in
# the demo's 300 steps, not even with the labels as a supervised target; the histology clusters (29 and 51 px) were
# learned within 50 steps.
SIZES = {"small": 0.12, "large": 0.2}
# Histology draws a cluster of atypical nuclei instead of a blob: the cluster's radius per size.
CLUSTER_RADII = {"small": 0.18, "large": 0.32}


@dataclass(frozen=True)
class Lesion:
    """Where a nodule is drawn, decided before rendering so that the caption can describe it.

    Attributes:
        cy: centre, vertical, normalised ([-1, 1], -1 at the top); for MRI relative to the brain's centre (which
            is jittered by at most 0.04).
        cx: centre, horizontal, likewise.
        r: radius in normalised units (the atypical cluster's radius for histology).
    """

    cy: float
    cx: float
    r: float


# Per modality: the range of the lesion's centre, vertical and horizontal (distance from the midline), and the
# organ's edges it must stay inside of (top, bottom, inner, outer): the lung on a radiograph and a CT slice (CT:
# away from the chest wall), the hemisphere (beside the ventricles) on an MRI.
PLACES = {
    "xray": ((-0.38, 0.25), (0.28, 0.44), (-0.6, 0.5, 0.1, 0.62)),
    "ct": ((-0.3, 0.2), (0.3, 0.55), (-0.46, 0.42, 0.12, 0.72)),
    "mri": ((-0.4, 0.4), (0.24, 0.4), (-0.7, 0.7, 0.12, 0.62)),
}


def place_lesion(modality: str, side: str, size: str, rng: np.random.Generator) -> Lesion:
    """A lesion of ``size`` on ``side``, at a random height and depth in the organ, inside it (see PLACES)."""
    if modality == "histology":
        return Lesion(rng.uniform(-0.45, 0.45), _side_sign(side, radiological=False) * rng.uniform(0.35, 0.55),
                      CLUSTER_RADII[size])  # fmt: skip
    (y0, y1), (x0, x1), (top, bottom, inner, outer) = PLACES[modality]
    r = SIZES[size] * rng.uniform(0.85, 1.15)
    cy = rng.uniform(max(y0, top + r), min(y1, bottom - r))
    cx = _side_sign(side) * rng.uniform(max(x0, inner + r), min(x1, outer - r))
    return Lesion(cy, cx, r)


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1]: yy (size, 1) and xx (1, size), broadcasting to (size, size)."""
    c = ((np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1).astype(np.float32)
    return c[:, None], c[None, :]


def _ellipse(yy, xx, cy, cx, ry, rx, edge=0.08) -> np.ndarray:
    """Soft-edged filled ellipse, 1 inside, 0 outside, a linear ramp of relative width ``edge``."""
    d = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    return np.clip((1.0 - d) / edge, 0.0, 1.0)


def _blob_shape(r: float):
    """A round lesion of radius ``r``: a soft disk with a slightly brighter core."""

    def shape(yy, xx, cy, cx):
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / r
        return np.clip((1.0 - d) / 0.35, 0.0, 1.0) * (0.8 + 0.2 * np.exp(-2.0 * d * d))

    return shape


def _add_local(img, yy, xx, cy, cx, reach, amp, shape) -> None:
    """``img += amp * shape(...)`` only on the window where a small shape (radius ``reach``) is non-zero."""
    n = img.shape[0]
    lo = lambda c: max(0, int((c - reach + 1) * n / 2) - 1)  # noqa: E731
    hi = lambda c: min(n, int((c + reach + 1) * n / 2) + 2)  # noqa: E731
    ys, xs = slice(lo(cy), hi(cy)), slice(lo(cx), hi(cx))
    img[ys, xs] += amp * shape(yy[ys], xx[:, xs], cy, cx)


def _dot(yy, xx, cy, cx) -> np.ndarray:
    """A tiny bright vessel cross-section."""
    return np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4e-4)


def _side_sign(side: str, radiological: bool = True) -> float:
    """x direction of a side: patient's right is on the viewer's left in radiology images."""
    right = -1.0 if radiological else 1.0
    return right if side == "right" else -right


def _finish(img: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Global contrast/brightness jitter and noise, then uint8."""
    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-0.05, 0.05)
    img = img + rng.normal(0.0, noise, img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render(modality: str, lesion: Lesion | None, rng, lesion_rng, image_size: int) -> np.ndarray:
    """Render one image, with ``lesion`` if given: (S, S) uint8 for the grey modalities, (S, S, 3) for histology.

    ``rng`` draws the anatomy and the noise, ``lesion_rng`` the lesion's own details (contrast, atypical nuclei):
    the same sample without its lesion is the same image but for the lesion.
    """
    yy, xx = _grid(image_size)
    draw = {"xray": _xray, "ct": _ct, "mri": _mri, "histology": _histology}[modality]
    return draw(yy, xx, rng, (lesion, lesion_rng) if lesion else None, image_size)


def _xray(yy, xx, rng, lesion, _size) -> np.ndarray:
    j = lambda s: rng.uniform(-s, s)  # noqa: E731  small jitter helper
    img = np.full(np.broadcast_shapes(yy.shape, xx.shape), 0.05, np.float32)
    body = _ellipse(yy, xx, 0.18 + j(0.05), j(0.04), 1.05, 0.84 + j(0.05), edge=0.18)
    img += 0.40 * body
    lungs = sum(_ellipse(yy, xx, -0.05 + j(0.04), s * (0.36 + j(0.03)), 0.6 + j(0.05), 0.26, 0.3) for s in (-1, 1))
    img -= 0.3 * lungs
    # Posterior ribs: arcs rising from the spine and falling laterally, vectorised over ribs (K, S, S).
    y0 = (-0.7 + 0.19 * np.arange(6) + j(0.04)).astype(np.float32)[:, None, None]
    ax = np.abs(xx)
    curve = y0 - 0.35 * ax + 1.1 * np.maximum(ax - 0.3, 0) ** 2
    ribs = np.exp(-(((yy - curve) / 0.03) ** 2)).sum(axis=0)
    img += 0.11 * ribs * _ellipse(yy, xx, -0.05, 0, 0.75, 0.72, 0.3)
    img += 0.24 * np.exp(-((xx / 0.07) ** 2)) * body  # spine and mediastinum
    img += 0.14 * _ellipse(yy, xx, 0.2 + j(0.04), 0.09 + j(0.04), 0.27, 0.25, 0.3)  # heart, patient's left
    img += 0.15 * np.exp(-(((yy - (-0.64 + 0.18 * np.abs(xx))) / 0.03) ** 2)) * (np.abs(xx) < 0.62)  # clavicles
    if lesion:
        (cy, cx, r), lrng = astuple(lesion[0]), lesion[1]
        _add_local(img, yy, xx, cy, cx, r, lrng.uniform(0.58, 0.7), _blob_shape(r))
    return _finish(img, rng, 0.03)


def _ct(yy, xx, rng, lesion, _size) -> np.ndarray:
    j = lambda s: rng.uniform(-s, s)  # noqa: E731
    cy, rx, ry = 0.05 + j(0.04), 0.88 + j(0.05), 0.68 + j(0.05)
    body = _ellipse(yy, xx, cy, j(0.03), ry, rx, 0.03)
    img = 0.02 + 0.52 * body - 0.12 * (body - _ellipse(yy, xx, cy, 0, ry - 0.07, rx - 0.07, 0.05)).clip(0, 1)
    lungs = sum(
        _ellipse(yy, xx, -0.02 + j(0.03), s * (0.42 + j(0.03)), 0.46 + j(0.04), 0.3 + j(0.03), 0.12) for s in (-1, 1)
    )
    lungs = np.clip(lungs, 0, 1)
    img = img * (1 - lungs) + 0.05 * lungs
    # Lung vessels: tiny bright dots a nodule must be told apart from.
    for s in rng.choice((-1.0, 1.0), 10):
        _add_local(img, yy, xx, rng.uniform(-0.35, 0.3), s * rng.uniform(0.25, 0.6), 0.07, 0.22, _dot)
    img = np.maximum(img, 0.6 * _ellipse(yy, xx, 0.05, 0.04, 0.28, 0.22, 0.1))  # heart
    img = np.maximum(img, 0.66 * _ellipse(yy, xx, 0.34, -0.12, 0.07, 0.07, 0.2))  # aorta
    img = np.maximum(img, 0.95 * _ellipse(yy, xx, 0.5 + j(0.02), j(0.02), 0.11, 0.11, 0.15))  # vertebral body
    img = np.maximum(img, 0.85 * _ellipse(yy, xx, 0.66, 0, 0.06, 0.035, 0.2))  # spinous process
    if lesion:
        (cy, cx, r), lrng = astuple(lesion[0]), lesion[1]
        _add_local(img, yy, xx, cy, cx, r, lrng.uniform(0.72, 0.88), _blob_shape(r))
    return _finish(img, rng, 0.025)


def _mri(yy, xx, rng, lesion, _size) -> np.ndarray:
    j = lambda s: rng.uniform(-s, s)  # noqa: E731
    cy, cx = j(0.04), j(0.04)
    skull = _ellipse(yy, xx, cy, cx, 0.88, 0.72, 0.04) - _ellipse(yy, xx, cy, cx, 0.8, 0.64, 0.04)
    brain = _ellipse(yy, xx, cy, cx, 0.77, 0.61, 0.05)
    dy, dx = (yy - cy) / 0.77, (xx - cx) / 0.61
    r, theta = np.sqrt(dy * dy + dx * dx), np.arctan2(dy, dx)
    # Gyri: a folded radial pattern bent by a smooth random field, strongest toward the cortex.
    size = yy.shape[0]
    warp = np.asarray(Image.fromarray((rng.random((5, 5)) * 255).astype(np.uint8)).resize((size, size)), np.float32)
    gyri = 0.5 + 0.5 * np.sin(20 * theta + 12 * r + warp / 255.0 * 6.0 + 1.5 * np.sin(5 * theta))
    img = 0.04 + 0.8 * np.clip(skull, 0, 1) + brain * (0.4 + 0.18 * gyri * np.clip((r - 0.3) / 0.4, 0, 1))
    img -= 0.16 * np.exp(-(((xx - cx) / 0.012) ** 2)) * brain * (np.abs(yy - cy) < 0.66)  # interhemispheric fissure
    ventricles = sum(_ellipse(yy, xx, cy - 0.04, cx + s * 0.09, 0.2 + j(0.03), 0.055, 0.3) for s in (-1, 1))
    ventricles = np.clip(ventricles, 0, 1)
    img = img * (1 - ventricles) + 0.1 * ventricles
    if lesion:
        (ly, lx, r), lrng = astuple(lesion[0]), lesion[1]
        _add_local(img, yy, xx, cy + ly, cx + lx, r, lrng.uniform(0.5, 0.64), _blob_shape(r))
    return _finish(img, rng, 0.025)


def _histology(yy, xx, rng, lesion, size) -> np.ndarray:
    # Eosin-stained stroma with slow variation, on a light background.
    field = Image.fromarray((rng.random((6, 6)) * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    stroma = (0.45 + 0.4 * np.asarray(field, np.float32) / 255.0)[..., None]
    background = np.array([0.97, 0.9, 0.94], np.float32)
    eosin = np.array([0.9, 0.5, 0.7], np.float32) * rng.uniform(0.92, 1.05)
    img = background * (1 - stroma) + eosin * stroma
    scale = size / 160.0
    nuclei = _nuclei(rng, size, rng.integers(55, 85), (-1, 1), (-1, 1), (1.8 * scale, 3.2 * scale))
    img = _stain(img, nuclei, np.array([0.4, 0.22, 0.58], np.float32))
    if lesion:
        (cy, cx, radius), lrng = astuple(lesion[0]), lesion[1]
        # about the same nuclei density for both sizes
        count = int(lrng.integers(35, 45) if radius < 0.25 else lrng.integers(100, 120))
        atypical = _nuclei(
            lrng,
            size,
            count,
            (cy - radius, cy + radius),
            (cx - radius, cx + radius),
            (3.0 * scale, 5.0 * scale),
            disk=(cy, cx, radius),
        )
        img = _stain(img, atypical, np.array([0.22, 0.07, 0.38], np.float32))
    img = img + rng.normal(0.0, 0.02, img.shape).astype(np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _nuclei(rng, size, count, yr, xr, rr, disk=None) -> np.ndarray:
    """A (S, S, 1) coverage mask of ``count`` elliptical nuclei drawn with PIL (fast C drawing)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    ys, xs = rng.uniform(*yr, count), rng.uniform(*xr, count)
    if disk is not None:  # keep the cluster round
        keep = (ys - disk[0]) ** 2 + (xs - disk[1]) ** 2 <= disk[2] ** 2
        ys, xs = ys[keep], xs[keep]
    radii = rng.uniform(*rr, (len(ys), 2))
    for y, x, (ry, rx) in zip((ys + 1) * size / 2, (xs + 1) * size / 2, radii, strict=True):
        draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=int(rng.integers(190, 255)))
    mask = mask.filter(ImageFilter.GaussianBlur(0.7))
    return (np.asarray(mask, np.float32) / 255.0)[..., None]


def _stain(img: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
    return img * (1 - mask) + colour * mask
