"""Images read in place from .zip and .tar archives; members that escape or are links are refused."""

from __future__ import annotations

import csv
import io
import tarfile
import zipfile

import pytest

from tests.data_prep.conftest import jpeg_bytes
from tests.data_prep.readback import check_accounting, reasons_by_id

NAMES = ["good.jpg", "sub/also_good.jpg", "missing.jpg", "../evil.jpg", "/abs.jpg", "link.jpg", "hard.jpg"]


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_tar(path):
    with tarfile.open(path, "w") as tar:
        add(tar, "good.jpg", jpeg_bytes(seed=1))
        add(tar, "./sub/also_good.jpg", jpeg_bytes(seed=2))
        add(tar, "../evil.jpg", jpeg_bytes(seed=3))  # a crafted member name
        add(tar, "/abs.jpg", jpeg_bytes(seed=4))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/hostname"
        tar.addfile(link)
        hard = tarfile.TarInfo("hard.jpg")
        hard.type, hard.linkname = tarfile.LNKTYPE, "good.jpg"
        tar.addfile(hard)


def make_zip(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("good.jpg", jpeg_bytes(seed=1))
        z.writestr("sub/also_good.jpg", jpeg_bytes(seed=2))
        z.writestr("../evil.jpg", jpeg_bytes(seed=3))
        z.writestr("/abs.jpg", jpeg_bytes(seed=4))
        link = zipfile.ZipInfo("link.jpg")
        link.external_attr = 0o120777 << 16  # a symbolic link
        z.writestr(link, "/etc/hostname")
        z.writestr("hard.jpg", b"not really an image")


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_archive_members(kind, tmp_path, run_cli):
    archive = tmp_path / f"images.{kind}"
    (make_tar if kind == "tar" else make_zip)(archive)
    table = tmp_path / "t.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([["file", "caption"], *[[n, f"Caption of {n}."] for n in NAMES]])
    code, out, _ = run_cli("csv", table, "-o", tmp_path / "out", "--images", archive, "--image-column", "file",
                           "--caption-column", "caption", "--workers", "2")  # fmt: skip
    assert code == 0
    _, samples, rejected = check_accounting(tmp_path / "out", out)
    assert sorted(s["json"]["id"] for s in samples) == ["good.jpg", "sub/also_good.jpg"]
    assert samples[0]["image"] == jpeg_bytes(seed=1)  # read in place, bytes kept
    reasons = reasons_by_id(rejected)
    assert reasons["missing.jpg"] == "missing_image"
    assert reasons["../evil.jpg"] == reasons["/abs.jpg"] == reasons["link.jpg"] == "path_escape"
    assert reasons["hard.jpg"] == ("path_escape" if kind == "tar" else "unreadable_image")


def test_compressed_tar_is_a_clear_error(tmp_path, run_cli):
    archive = tmp_path / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        add(tar, "good.jpg", jpeg_bytes())
    table = tmp_path / "t.csv"
    table.write_text("file,caption\ngood.jpg,A caption.\n")
    code, _, err = run_cli("csv", table, "-o", tmp_path / "out", "--images", archive, "--image-column", "file",
                           "--caption-column", "caption")  # fmt: skip
    assert code == 2 and "extract it first" in err and str(archive) in err
