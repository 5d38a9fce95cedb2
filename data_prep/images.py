"""Image handling shared by all converters: safe open, conversion to 8-bit RGB or L, resize, encode.

:func:`process_image` is the unit of work sent to the process pool: it takes one image input and returns either an
:class:`EncodedImage` ready for the shard or an :class:`ImageFailure` with a rejection reason. It never raises for bad
input, so one broken file cannot stop a conversion.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from data_prep.records import Reason
from medclip_train.data.image_modes import to_8bit, window_to_uint8

# 64 MP (8k x 8k): above any figure in the supported releases, below what a worker can decode without swapping.
# Checked from the header before any pixel is decoded; PIL's own bomb warning/error is also turned into a rejection.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024


@dataclass(frozen=True)
class ImagePolicy:
    """How images are written.

    Attributes:
        max_side: longest side after resizing (aspect kept, never upscaled); ``None`` keeps the size.
        jpeg_quality: quality of re-encoded JPEGs.
        max_pixels: images with more pixels are rejected as decompression bombs.
        content_hash: compute a hash of the decoded pixels (needed for ``--dedupe``).
    """

    max_side: int | None = None
    jpeg_quality: int = 95
    max_pixels: int = MAX_IMAGE_PIXELS
    content_hash: bool = False


@dataclass(frozen=True)
class ArrayImage:
    """Pixels held in memory (MedMNIST arrays, rendered demo images): ``(H, W)`` or ``(H, W, 3)``.

    Attributes:
        pixels: uint8 arrays are used as they are; wider types are windowed to their min..max range.
        format: ``"png"`` (lossless, for small benchmark images) or ``"jpg"``.
    """

    pixels: np.ndarray
    format: str = "png"


@dataclass(frozen=True)
class EncodedImage:
    """An image ready to be written: encoded bytes plus what the ``.json`` says about it."""

    data: bytes
    ext: str
    width: int
    height: int
    original_width: int
    original_height: int
    original_mode: str
    passthrough: bool
    content_hash: str | None = None


@dataclass(frozen=True)
class ImageFailure:
    """Why an image cannot be used."""

    reason: str
    detail: str = ""


class _Rejected(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def process_image(image: Any, policy: ImagePolicy) -> EncodedImage | ImageFailure:
    """Turn one image input into shard bytes.

    Args:
        image: a file ``Path``, encoded ``bytes``, an archive member with ``read_image_bytes()`` (read inside the
            worker), an :class:`ArrayImage`, or an object whose ``render()`` returns one (rendered inside the
            worker, so drawing runs in parallel too).
        policy: size, quality and safety limits.

    Returns:
        The encoded image, or the reason it was rejected.
    """
    try:
        if hasattr(image, "render"):
            image = image.render()
        if isinstance(image, ArrayImage):
            return _encode_array(image, policy)
        if isinstance(image, Path):
            data = _read_bytes(image)
        elif isinstance(image, bytes):
            data = image
        else:
            data = _read_member(image)
        return _encode_file_bytes(data, policy)
    except _Rejected as e:
        return ImageFailure(e.reason, e.detail)
    except Exception as e:
        # Decoders of untrusted files can fail in ways no list of exceptions foresees (a plugin's KeyError, a
        # TIFF tag TypeError): one such file is rejected with the error as detail, the conversion goes on.
        return ImageFailure(Reason.UNREADABLE_IMAGE, f"{type(e).__name__}: {e}")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise _Rejected(Reason.MISSING_IMAGE, str(path)) from None
    except OSError as e:
        raise _Rejected(Reason.UNREADABLE_IMAGE, f"{path}: {e}") from None


def _read_member(member: Any) -> bytes:
    try:
        return member.read_image_bytes()
    except OSError as e:
        raise _Rejected(Reason.UNREADABLE_IMAGE, str(e)) from None


def open_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, draft_size: tuple[int, int] | None = None) -> Image:
    """Open and fully decode image bytes, turning every failure into a rejection reason.

    Args:
        data: encoded image.
        max_pixels: pixel budget checked from the header, before decoding.
        draft_size: for JPEGs, let libjpeg decode at a reduced scale no smaller than this (much faster for large
            images that are going to be downsized anyway).

    Raises:
        _Rejected: ``decompression_bomb``, ``truncated_image`` or ``unreadable_image``.
    """
    with warnings.catch_warnings():
        # PIL only warns between MAX_IMAGE_PIXELS and twice that; a warning is as much a bomb as the error.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
            if im.width * im.height > max_pixels:
                raise _Rejected(Reason.DECOMPRESSION_BOMB, f"{im.width}x{im.height} exceeds {max_pixels} pixels")
            if draft_size and im.format == "JPEG" and im.mode in ("RGB", "L"):
                im.draft(im.mode, draft_size)
            im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _Rejected(Reason.DECOMPRESSION_BOMB, str(e)) from None
        except UnidentifiedImageError:
            raise _Rejected(Reason.UNREADABLE_IMAGE, "not a recognised image format") from None
        except OSError as e:
            reason = Reason.TRUNCATED_IMAGE if "truncat" in str(e).lower() else Reason.UNREADABLE_IMAGE
            raise _Rejected(reason, str(e)) from None
        except (SyntaxError, ValueError, EOFError, struct.error, zlib.error, MemoryError) as e:
            raise _Rejected(Reason.UNREADABLE_IMAGE, f"{type(e).__name__}: {e}") from None
    return im


def _can_pass_through(im: Image.Image) -> bool:
    """Whether the source file can be stored as it is: a plain 8-bit RGB/grey JPEG or PNG."""
    if im.format not in ("JPEG", "PNG") or im.mode not in ("RGB", "L"):
        return False
    # A PNG may carry a tRNS chunk on an RGB/L image: it then needs compositing like any alpha image.
    return "transparency" not in im.info


def _encode_file_bytes(data: bytes, policy: ImagePolicy) -> EncodedImage:
    header = open_header(data, policy.max_pixels)
    target = fit_size(header.size, policy.max_side)
    draft = target if target != header.size else None
    im = open_image(data, policy.max_pixels, draft)
    original_mode = header.mode
    digest = None
    if target == header.size and _can_pass_through(im):
        if policy.content_hash:
            digest = pixel_hash(im)
        ext = "jpg" if im.format == "JPEG" else "png"
        return EncodedImage(data, ext, im.width, im.height, im.width, im.height, original_mode, True, digest)
    im = to_8bit(im)
    if policy.content_hash:
        digest = pixel_hash(im)
    im = resize(im, target)
    out = encode(im, "jpg", policy.jpeg_quality)
    w, h = header.size
    return EncodedImage(out, "jpg", im.width, im.height, w, h, original_mode, False, digest)


def open_header(data: bytes, max_pixels: int) -> Image.Image:
    """Parse only the header (size, mode, format) so the resize target is known before decoding."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _Rejected(Reason.DECOMPRESSION_BOMB, str(e)) from None
        except UnidentifiedImageError:
            raise _Rejected(Reason.UNREADABLE_IMAGE, "not a recognised image format") from None
        except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as e:
            raise _Rejected(Reason.UNREADABLE_IMAGE, f"{type(e).__name__}: {e}") from None
    if im.width * im.height > max_pixels:
        raise _Rejected(Reason.DECOMPRESSION_BOMB, f"{im.width}x{im.height} exceeds {max_pixels} pixels")
    return im


def _encode_array(image: ArrayImage, policy: ImagePolicy) -> EncodedImage:
    pixels = np.asarray(image.pixels)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[-1] not in (3, 4)):
        raise _Rejected(Reason.UNREADABLE_IMAGE, f"array of shape {pixels.shape} is not an image")
    if pixels.shape[0] * pixels.shape[1] > policy.max_pixels:
        raise _Rejected(Reason.DECOMPRESSION_BOMB, f"array of shape {pixels.shape}")
    if pixels.dtype != np.uint8:
        pixels = window_to_uint8(pixels)
    im = to_8bit(Image.fromarray(np.ascontiguousarray(pixels)))
    original = im.size
    digest = pixel_hash(im) if policy.content_hash else None
    im = resize(im, fit_size(im.size, policy.max_side))
    out = encode(im, image.format, policy.jpeg_quality)
    mode = f"array:{image.pixels.dtype}"
    return EncodedImage(out, image.format, im.width, im.height, *original, mode, False, digest)


def fit_size(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """The size after fitting the longest side into ``max_side``, keeping aspect; never upscales."""
    w, h = size
    if not max_side or max(w, h) <= max_side:
        return w, h
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def resize(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to ``size`` (a no-op when already there); BICUBIC with PIL's reducing gap is fast and sharp enough."""
    if im.size == size:
        return im
    return im.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def encode(im: Image.Image, fmt: str, jpeg_quality: int) -> bytes:
    """Encode an 8-bit RGB/L image as ``jpg`` or ``png``."""
    buf = io.BytesIO()
    if fmt == "png":
        im.save(buf, format="PNG", compress_level=6)
    else:
        im.save(buf, format="JPEG", quality=jpeg_quality)
    return buf.getvalue()


def pixel_hash(im: Image.Image) -> str:
    """Hash of the decoded pixels (mode, size and data): the same picture saved twice hashes the same."""
    h = hashlib.sha256(f"{im.mode}:{im.width}x{im.height}:".encode())
    h.update(im.tobytes())
    return h.hexdigest()
