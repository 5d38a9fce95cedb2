"""Symbolic links never publish a file from outside the input root, and every link met is counted."""

from __future__ import annotations

import csv
import os

import pytest

from data_prep.records import Reason, RecordRejected, safe_join
from tests.data_prep.conftest import jpeg_bytes
from tests.data_prep.readback import check_accounting, reasons_by_id

SECRET = jpeg_bytes(size=(20, 20), color=(250, 0, 0), seed=99)


def outside_files(tmp_path):
    """A file and a folder outside every input root: what a link must not make the converter read."""
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "secret.jpg").write_bytes(SECRET)
    (outside / "folder" / "also_secret.jpg").write_bytes(SECRET)
    return outside


def test_imagefolder_refuses_links_that_leave_the_root_and_counts_folder_links(tmp_path, run_cli):
    outside = outside_files(tmp_path)
    root = tmp_path / "root"
    cls = root / "cls"
    (cls / "nested").mkdir(parents=True)
    (cls / "a.jpg").write_bytes(jpeg_bytes(seed=1))
    (cls / "nested" / "b.jpg").write_bytes(jpeg_bytes(seed=2))
    os.symlink(outside / "secret.jpg", cls / "leak.jpg")  # a file link out of the root
    os.symlink(outside / "folder", cls / "linked_out")  # a folder link out of the root
    os.symlink(cls / "nested", cls / "linked_in")  # a folder link inside the root: not followed, still counted
    os.symlink(cls / "a.jpg", cls / "alias.jpg")  # a file link inside the root: a normal image
    out = tmp_path / "out"
    code, stdout, _ = run_cli("imagefolder", root, "-o", out)
    assert code == 0
    manifest, samples, rejected = check_accounting(out, stdout)
    assert sorted(s["json"]["id"] for s in samples) == ["cls/a.jpg", "cls/alias.jpg", "cls/nested/b.jpg"]
    assert all(s["image"] != SECRET for s in samples)
    assert reasons_by_id(rejected) == {
        "cls/leak.jpg": "path_escape",
        "cls/linked_out": "path_escape",
        "cls/linked_in": "unsupported_file",
    }
    assert manifest["counts"] == {"read": 6, "written": 3, "rejected": 3}


def test_imagefolder_whose_root_is_a_link_still_works(tmp_path, run_cli):
    real = tmp_path / "real"
    (real / "cls").mkdir(parents=True)
    (real / "cls" / "a.jpg").write_bytes(jpeg_bytes())
    os.symlink(real, tmp_path / "root")  # a common way to place a big image folder
    code, stdout, _ = run_cli("imagefolder", tmp_path / "root", "-o", tmp_path / "out")
    assert code == 0 and "written=1 rejected=0 read=1" in stdout


def test_table_paths_through_links_out_of_the_image_root_are_refused(tmp_path, run_cli):
    outside = outside_files(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    (images / "ok.jpg").write_bytes(jpeg_bytes())
    os.symlink(outside / "secret.jpg", images / "leak.jpg")
    os.symlink(outside / "folder", images / "sub")
    table = tmp_path / "t.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["path", "text"], ["ok.jpg", "Fine."], ["leak.jpg", "Leak by a file link."],
                                 ["sub/also_secret.jpg", "Leak by a folder link."]])  # fmt: skip
    out = tmp_path / "out"
    code, stdout, _ = run_cli("csv", table, "-o", out, "--images", images, "--image-column", "path",
                              "--caption-column", "text")  # fmt: skip
    assert code == 0
    _, samples, rejected = check_accounting(out, stdout)
    assert [s["json"]["id"] for s in samples] == ["ok.jpg"]
    assert reasons_by_id(rejected) == {"leak.jpg": "path_escape", "sub/also_secret.jpg": "path_escape"}
    assert all("outside" in r["detail"] for r in rejected)


def test_safe_join_resolves_links_for_every_converter(tmp_path):
    """roco, rocov2, medicat and the folder store of csv/jsonl/pmc-oa all join record paths with safe_join."""
    outside = outside_files(tmp_path)
    root = tmp_path / "figures"
    root.mkdir()
    (root / "real.jpg").write_bytes(jpeg_bytes())
    os.symlink(outside / "secret.jpg", root / "leak.jpg")
    os.symlink(outside / "folder", root / "sub")
    assert safe_join(root, "real.jpg") == root / "real.jpg"
    assert safe_join(root, "not_downloaded_yet.jpg") == root / "not_downloaded_yet.jpg"  # missing is not escaping
    for name in ("leak.jpg", "sub/also_secret.jpg", "../outside/secret.jpg", str(outside / "secret.jpg")):
        with pytest.raises(RecordRejected) as e:
            safe_join(root, name)
        assert e.value.reason == Reason.PATH_ESCAPE


def test_imagefolder_refuses_a_fifo_named_like_an_image(tmp_path, run_cli):
    """Reading a FIFO would block the conversion forever; it is counted as an unsupported file instead."""
    (tmp_path / "root" / "cls").mkdir(parents=True)
    (tmp_path / "root" / "cls" / "a.jpg").write_bytes(jpeg_bytes())
    os.mkfifo(tmp_path / "root" / "cls" / "pipe.jpg")
    code, stdout, _ = run_cli("imagefolder", tmp_path / "root", "-o", tmp_path / "out")
    assert code == 0
    _, _, rejected = check_accounting(tmp_path / "out", stdout)
    assert [(r["id"], r["reason"], r["detail"]) for r in rejected] == [
        ("cls/pipe.jpg", "unsupported_file", "not a regular file")
    ]
