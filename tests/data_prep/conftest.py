"""Fixtures for the data_prep tests: copies of the real-format fixtures, image factories, CLI runner."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.cli import main

REALDATA = Path(__file__).resolve().parents[1] / "fixtures" / "realdata"


@pytest.fixture
def realdata() -> Path:
    """The real-format fixtures (read-only: copy before adding images)."""
    return REALDATA


@pytest.fixture
def copy_fixture(tmp_path):
    """Copy a fixture folder into the test's tmp dir: ``copy_fixture("roco")`` -> path of the copy."""

    def copy(name: str) -> Path:
        dst = tmp_path / "input" / name
        shutil.copytree(REALDATA / name, dst)
        return dst

    return copy


@pytest.fixture
def run_cli(capsys):
    """Run ``medclip-prep`` in-process: returns ``(exit code, stdout, stderr)``."""

    def run(*argv) -> tuple[int, str, str]:
        code = main([str(a) for a in argv] + (["--quiet"] if argv and argv[0] != "inspect" else []))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def jpeg_bytes(size=(64, 48), color=(120, 30, 200), mode="RGB", quality=90, seed=0) -> bytes:
    """A small JPEG with some texture (so that truncating it really cuts image data)."""
    rng = np.random.default_rng(seed)
    base = np.zeros((size[1], size[0], 3), np.uint8) + np.array(color, np.uint8)
    noisy = np.clip(base.astype(int) + rng.integers(-30, 30, base.shape), 0, 255).astype(np.uint8)
    im = Image.fromarray(noisy).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
