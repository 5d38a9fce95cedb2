"""Sample keys: unique in what medclip-prep writes, and repeated keys in anyone's shards found by inspect."""

from __future__ import annotations

import io
import json
import tarfile

from data_prep.inspection import inspect_output
from data_prep.records import Record, short_hash
from data_prep.writer import WriteOptions, write_dataset
from tests.data_prep.conftest import jpeg_bytes
from tests.data_prep.readback import check_accounting


def test_keys_stay_unique_when_a_disambiguated_key_is_already_taken(tmp_path):
    """ "a.b" and "a_b" sanitise to the same key; the second gets a hash suffix, which a third id may already be."""
    taken = f"a_b_{short_hash('synthetic' + chr(0) + 'a_b')}"
    ids = ["a.b", taken, "a_b"]
    records = [Record("synthetic", i, "train", f"Caption {n}.", jpeg_bytes(seed=n), "gen") for n, i in enumerate(ids)]
    out = tmp_path / "out"
    write_dataset(records, out, WriteOptions(), "synthetic")
    _, samples, _ = check_accounting(out)  # asserts the keys are unique
    assert sorted(s["json"]["id"] for s in samples) == sorted(ids)
    assert inspect_output(out)["complete"]


def foreign_shard(path, keys: list[str]) -> None:
    """A shard written by another tool: one (jpg, txt) sample per key, in the given order."""
    with tarfile.open(path, "w") as tar:
        for n, key in enumerate(keys):
            for ext, data in (("jpg", jpeg_bytes(size=(8, 8), seed=n)), ("txt", f"caption {n}".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def webdataset_keys(paths) -> list[str]:
    import webdataset as wds

    samples = wds.WebDataset([str(p) for p in paths], shardshuffle=False)
    return [s["__key__"] for s in samples if "txt" in s]  # webdataset 1.x adds a key-only sample at shard ends


def test_inspect_counts_keys_that_come_back_later_as_readers_do(tmp_path):
    out = tmp_path / "foreign"
    out.mkdir()
    foreign_shard(out / "train-000000.tar", ["a", "b", "a", "c"])  # "a" again, not next to the first "a"
    foreign_shard(out / "train-000001.tar", ["b", "d"])  # "b" again, in another shard
    (out / "sizes.json").write_text(json.dumps({"train-000000.tar": 4, "train-000001.tar": 2}))
    keys = webdataset_keys(sorted(out.glob("*.tar")))
    assert keys == ["a", "b", "a", "c", "b", "d"]  # what a training run would read: six samples
    report = inspect_output(out)
    assert report["splits"]["train"]["samples"] == len(keys)
    assert report["repeated_keys"] == {"a": 2, "b": 2}
    repeated = [p for p in report["problems"] if "repeated" in p or "appears" in p]
    assert len(repeated) == 2 and "'a'" in repeated[0] and "'b'" in repeated[1]
    assert "train-000000.tar" in repeated[0] and "train-000001.tar" in repeated[1]
    assert not any("sizes.json says" in p for p in report["problems"])  # the counts agree once grouped as readers do
