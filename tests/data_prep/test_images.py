"""Image handling: every kind of bad or unusual image gets a reason or a correct 8-bit conversion."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from data_prep.images import ArrayImage, EncodedImage, ImageFailure, ImagePolicy, fit_size, process_image, to_8bit
from data_prep.records import Reason
from tests.data_prep.conftest import jpeg_bytes, png_bytes


def png_with_header(width: int, height: int) -> bytes:
    """A valid PNG whose IHDR declares ``width`` x ``height`` but carries almost no data: a decompression bomb."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def decode(result: EncodedImage) -> Image.Image:
    im = Image.open(io.BytesIO(result.data))
    im.load()
    return im


def test_plain_jpeg_keeps_its_bytes():
    data = jpeg_bytes()
    result = process_image(data, ImagePolicy(max_side=512))
    assert isinstance(result, EncodedImage)
    assert result.passthrough and result.data == data and result.ext == "jpg"


def test_resize_keeps_aspect_and_never_upscales():
    result = process_image(jpeg_bytes(size=(400, 100)), ImagePolicy(max_side=200))
    assert (result.width, result.height) == (200, 50) == decode(result).size
    assert (result.original_width, result.original_height) == (400, 100) and not result.passthrough
    small = process_image(jpeg_bytes(size=(40, 10)), ImagePolicy(max_side=200))
    assert (small.width, small.height) == (40, 10) and small.passthrough
    assert fit_size((1000, 10), 100) == (100, 1)


def test_missing_file(tmp_path):
    assert process_image(tmp_path / "nope.jpg", ImagePolicy()) == ImageFailure(
        Reason.MISSING_IMAGE, str(tmp_path / "nope.jpg")
    )


def test_truncated_jpeg_is_rejected():
    data = jpeg_bytes(size=(256, 256))
    result = process_image(data[: len(data) // 2], ImagePolicy())
    assert isinstance(result, ImageFailure) and result.reason == Reason.TRUNCATED_IMAGE


def test_garbage_bytes_are_rejected():
    result = process_image(b"this is not an image at all" * 10, ImagePolicy())
    assert isinstance(result, ImageFailure) and result.reason == Reason.UNREADABLE_IMAGE


@pytest.mark.parametrize("side", [100_000, 9_000])  # PIL's own bomb error; our stricter pixel limit
def test_png_bomb_is_rejected_before_decoding(side):
    result = process_image(png_with_header(side, side), ImagePolicy())
    assert isinstance(result, ImageFailure) and result.reason == Reason.DECOMPRESSION_BOMB


def test_16bit_png_is_windowed_by_its_real_range():
    values = np.linspace(1000, 3000, 64 * 32).reshape(32, 64).astype(np.uint16)  # a 12-bit-like range
    im16 = Image.fromarray(values)
    assert im16.mode.startswith("I;16")
    result = process_image(png_bytes(im16), ImagePolicy())
    out = np.asarray(decode(result))
    assert decode(result).mode == "L"
    # JPEG is lossy: the extremes land near 0 and 255 (dividing by 256 would give 4..12).
    assert out.min() <= 3 and out.max() >= 252
    assert result.original_mode.startswith("I;16")
    exact = np.asarray(to_8bit(Image.open(io.BytesIO(png_bytes(im16)))))  # before the lossy JPEG encode
    assert exact.min() == 0 and exact.max() == 255 and exact[0, 0] == 0 and exact[-1, -1] == 255


def test_16bit_array_windowing_is_exact():
    values = np.array([[1000, 2000], [3000, 1500]], np.uint16)
    result = process_image(ArrayImage(values, "png"), ImagePolicy())
    assert np.asarray(decode(result)).tolist() == [[0, 128], [255, 64]]


def test_cmyk_jpeg_becomes_rgb():
    rgb = Image.new("RGB", (32, 32), (200, 40, 40))
    buf = io.BytesIO()
    rgb.convert("CMYK").save(buf, format="JPEG", quality=95)
    result = process_image(buf.getvalue(), ImagePolicy())
    im = decode(result)
    assert im.mode == "RGB" and not result.passthrough
    r, g, b = im.getpixel((16, 16))
    assert r > 150 and g < 90 and b < 90  # still red, not inverted


def test_palette_png_becomes_rgb():
    im = Image.new("RGB", (16, 16), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    result = process_image(png_bytes(im), ImagePolicy())
    out = decode(result)
    assert out.mode == "RGB"
    assert abs(out.getpixel((8, 8))[1] - 200) < 10


def test_rgba_png_is_composited_on_white():
    im = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent red
    im.putpixel((0, 0), (0, 0, 255, 255))
    result = process_image(png_bytes(im), ImagePolicy())
    out = decode(result).convert("RGB")
    assert all(c > 240 for c in out.getpixel((10, 10)))  # white background, not red or black
    assert decode(result).mode == "RGB"


def test_la_png_stays_grey():
    im = Image.new("LA", (8, 8), (0, 128))
    out = decode(process_image(png_bytes(im), ImagePolicy()))
    assert out.mode == "L" and 120 < out.getpixel((4, 4)) < 136  # black at half alpha over white


def test_content_hash_ignores_container():
    pixels = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    a = process_image(png_bytes(Image.fromarray(pixels)), ImagePolicy(content_hash=True))
    b = process_image(ArrayImage(pixels, "png"), ImagePolicy(content_hash=True))
    assert a.content_hash == b.content_hash is not None


def test_unexpected_decoder_errors_become_a_reason():
    class Exploding:
        def read_image_bytes(self):
            raise KeyError("a plugin bug")

    result = process_image(Exploding(), ImagePolicy())
    assert isinstance(result, ImageFailure) and result.reason == Reason.UNREADABLE_IMAGE and "KeyError" in result.detail
