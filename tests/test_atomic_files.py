"""medclip_train.atomic_files: the one writer of files that must be whole (shards, manifests, checkpoints, cache)."""

from __future__ import annotations

import os
import stat

import pytest

from medclip_train.atomic_files import AtomicFile, atomic_write_json


@pytest.mark.parametrize("unique", [False, True])
def test_an_error_mid_write_leaves_the_previous_file_and_no_temporary(tmp_path, unique):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="killed"), AtomicFile(path, unique=unique) as f:
        f.write(b"half of the new")
        raise RuntimeError("killed")
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_the_temporary_names_are_the_ones_the_cleanup_code_looks_for(tmp_path):
    # medclip-prep's output checks look for NAME.tmp; run_dir clears .NAME.XXXX.tmp left by a killed save.
    shard = AtomicFile(tmp_path / "train-000000.tar")
    checkpoint = AtomicFile(tmp_path / "last.ckpt", unique=True)
    assert shard.tmp.name == "train-000000.tar.tmp"
    assert checkpoint.tmp.name.startswith(".last.ckpt.") and checkpoint.tmp.name.endswith(".tmp")
    shard.commit()
    checkpoint.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-000000.tar"]


def test_a_unique_temporary_ends_with_the_permissions_open_would_give(tmp_path):
    umask = os.umask(0o027)
    try:
        with AtomicFile(tmp_path / "a.pt", unique=True) as f:  # mkstemp alone would leave 0600
            f.write(b"x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.pt").stat().st_mode) == 0o640


def test_json_document_is_indented_utf8_with_a_final_newline(tmp_path):
    atomic_write_json(tmp_path / "manifest.json", {"caption": "pleural effusion, 5 mm"})
    assert (tmp_path / "manifest.json").read_bytes() == b'{\n  "caption": "pleural effusion, 5 mm"\n}\n'
