"""The output folder is shared with the user: --overwrite replaces only what medclip-prep wrote."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest

from data_prep import writer
from data_prep.records import PrepError, Record
from data_prep.writer import MARKER, WriteOptions, write_dataset
from tests.data_prep.conftest import jpeg_bytes
from tests.data_prep.readback import check_accounting


def image_folder(root, n: int = 3):
    for i in range(n):
        (root / "cls").mkdir(parents=True, exist_ok=True)
        (root / "cls" / f"{i}.jpg").write_bytes(jpeg_bytes(size=(16, 16), seed=i))
    return root


def user_tar(path) -> bytes:
    """A real tar archive the user downloaded into the output folder."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("release/captions.csv")
        data = b"id,caption\n1,x\n"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def test_overwrite_leaves_the_users_files_and_names_them(tmp_path, run_cli):
    out = tmp_path / "out"
    folder = image_folder(tmp_path / "images")
    assert run_cli("imagefolder", folder, "-o", out)[0] == 0
    download = user_tar(out / "raw_dataset_download.tar")
    (out / "notes.txt").write_text("the user's own notes")
    code, stdout, err = run_cli("imagefolder", folder, "-o", out, "--overwrite", "--samples-per-shard", "2")
    assert code == 0
    assert (out / "raw_dataset_download.tar").read_bytes() == download
    assert (out / "notes.txt").read_text() == "the user's own notes"
    warning = [line for line in err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "raw_dataset_download.tar" in warning[0] and "notes.txt" in warning[0]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["shards"] == ["train-000000.tar", "train-000001.tar"]
    assert sorted(p.name for p in out.glob("*.tar")) == [
        "raw_dataset_download.tar",
        *manifest["splits"]["train"]["shards"],
    ]
    assert not (out / MARKER).exists()  # the marker only marks a conversion in progress


def test_shards_nobody_vouches_for_are_never_replaced(tmp_path, run_cli):
    """Shard-named files without a medclip-prep manifest or marker may be someone else's: refused, kept intact."""
    out = tmp_path / "out"
    out.mkdir()
    theirs = user_tar(out / "train-000000.tar")
    code, stdout, err = run_cli("imagefolder", image_folder(tmp_path / "images"), "-o", out, "--overwrite")
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and "train-000000.tar" in err and str(out) in err
    assert (out / "train-000000.tar").read_bytes() == theirs
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.tar"]


def test_shards_the_manifest_does_not_list_are_not_ours(tmp_path, run_cli):
    out = tmp_path / "out"
    folder = image_folder(tmp_path / "images")
    assert run_cli("imagefolder", folder, "-o", out)[0] == 0
    stray = user_tar(out / "train-000007.tar")
    code, _, err = run_cli("imagefolder", folder, "-o", out, "--overwrite")
    assert code == 2 and "train-000007.tar" in err
    assert (out / "train-000007.tar").read_bytes() == stray and (out / "manifest.json").is_file()


def records(n: int, fail_after: int | None = None):
    for i in range(n):
        if i == fail_after:
            raise KeyboardInterrupt
        yield Record("synthetic", f"r{i}", "train", f"Caption {i}.", jpeg_bytes(size=(8, 8), seed=i), "gen")


def test_an_interrupted_run_is_marked_and_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        write_dataset(records(30, fail_after=25), out, WriteOptions(samples_per_shard=2), "synthetic")
    names = sorted(p.name for p in out.iterdir())
    assert (
        names[0] == MARKER and len(names) > 2 and all(n.startswith("train-") and n.endswith(".tar") for n in names[1:])
    )
    (out / "keep.me").write_text("x")
    with pytest.raises(PrepError, match="--overwrite"):
        write_dataset(records(3), out, WriteOptions(), "synthetic")
    write_dataset(records(3), out, WriteOptions(overwrite=True), "synthetic")
    check_accounting(out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.me", "manifest.json", "rejected.jsonl", "sizes.json",
                                                     "train-000000.tar"]  # fmt: skip


@pytest.mark.parametrize("full_file", ["train-000000.tar.tmp", "rejected.jsonl.tmp", "manifest.json.tmp"])
def test_disk_full_is_one_line_and_leaves_no_temporary_file(full_file, tmp_path, run_cli, monkeypatch):
    """A real ENOSPC from the kernel: the file medclip-prep is about to write is a link to /dev/full.

    The link is made right after the output folder is prepared (as a disk filling up mid-run would), for a shard,
    for the rejection log (written as records are rejected, closed at the end) and for the manifest (written last).
    """
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux)")
    prepare = writer.prepare_output

    def prepare_then_fill(output, overwrite):
        prepare(output, overwrite)
        (output / full_file).symlink_to("/dev/full")

    monkeypatch.setattr(writer, "prepare_output", prepare_then_fill)
    folder = image_folder(tmp_path / "images", n=6)
    (folder / "cls" / "broken.jpg").write_bytes(b"not a jpeg")  # one rejection, so rejected.jsonl gets a line
    out = tmp_path / "out"
    code, stdout, err = run_cli("imagefolder", folder, "-o", out, "--samples-per-shard", "4")
    assert code == 1 and stdout == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("medclip-prep: error: no space left on device") and str(out) in err
    assert sorted(p.name for p in out.glob("*.tmp")) == []
    assert not (out / "manifest.json").exists()  # the folder does not look complete
    assert (out / MARKER).is_file()  # and says a conversion was interrupted in it
