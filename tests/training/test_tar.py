"""data/tar.py against webdataset (group_by_keys over tar_file_expander) and Python's tarfile as references."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest
from webdataset import TarWriter
from webdataset.tariterators import group_by_keys, tar_file_expander

from medclip_train.data import tar

URL = "shard.tar"


def webdataset_samples(data: bytes) -> tuple[list[dict], Exception | None]:
    """What the stream got from webdataset: the samples before the first error (the group webdataset flushes after
    an error is dropped by the stream, see stream._shard_samples) and that error."""
    failure: list[Exception] = []

    def handler(exn: Exception) -> bool:
        failure.append(exn)
        return False

    out = []
    files = tar_file_expander([{"url": URL, "stream": io.BytesIO(data)}], handler=handler)
    for sample in group_by_keys(files, handler=handler):
        if failure:
            break
        if sample:
            out.append(sample)
    return out, failure[0] if failure else None


def our_samples(data: bytes, stream=None) -> tuple[list[dict], Exception | None]:
    out = []
    try:
        for sample in tar.samples(stream or io.BytesIO(data), URL):
            out.append(sample)
    except Exception as exn:  # noqa: BLE001 - compared with the reference's
        return out, exn
    return out, None


def tarfile_raises(data: bytes) -> bool:
    """Whether reading every member of the stream with tarfile (as webdataset does) raises."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tf:
            for info in tf:
                if info.isreg():
                    tf.extractfile(info).read()
    except tarfile.TarError:
        return True
    return False


def assert_same(data: bytes, stream=None) -> tuple[list[dict], Exception | None]:
    ours, err = our_samples(data, stream)
    ref, ref_err = webdataset_samples(data)
    assert ours == ref
    if ref_err is not None:
        assert err is not None and type(err) is type(ref_err) or isinstance(err, tarfile.ReadError), (err, ref_err)
    elif err is not None:
        # tarfile ends quietly at a bad header after the first member; we name it, with the same samples.
        assert isinstance(err, tar.TarHeaderError), err
    assert (err is not None and not isinstance(err, tar.TarHeaderError)) == tarfile_raises(data) or isinstance(
        err, ValueError
    ), err
    return ours, err


def member(tf: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if kind == tarfile.SYMTYPE:
        info.linkname = "elsewhere.jpg"
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def tar_bytes(members: list[tuple], fmt: int = tarfile.GNU_FORMAT, **kwargs) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, **kwargs) as tf:
        for m in members:
            member(tf, *m)
    return buf.getvalue()


def webdataset_shard(tmp_path: Path, n: int = 6) -> bytes:
    path = tmp_path / "wds.tar"
    with TarWriter(str(path)) as sink:
        for i in range(n):
            sink.write(
                {
                    "__key__": f"s{i:03d}",
                    "jpg": bytes([i]) * (700 + 300 * i),
                    "txt": f"caption {i}".encode(),
                    "json": b"{}" if i % 2 else b"",  # empty files are samples' files too
                    "seg.png": b"\x89PNG" * i,
                }
            )
    return path.read_bytes()


LONG = "a" * 90 + "/" + "b" * 120  # needs a long name in every format (ustar prefix is at most 155 bytes)
MEMBERS = [
    ("dir", b"", tarfile.DIRTYPE),
    ("dir/x1.jpg", b"jpeg-1"),
    ("dir/x1.TXT", b"upper-case suffix"),
    ("dir/x1.tar.gz", b"multi-dot suffix"),
    ("link.jpg", b"", tarfile.SYMTYPE),
    ("__meta__", b"webdataset metadata"),
    ("__index__/x.jpg", b"skipped too"),
    ("README", b"no suffix"),
    (".hidden.jpg", b"no key"),
    (LONG + ".jpg", b"long"),
    (LONG + ".txt", b"long caption"),
    ("é/ünïcode.jpg", "ça".encode()),
    ("y.jpg", b"y"),
    ("z.jpg", b""),
    ("y.txt", b"y again: not consecutive, a new sample"),
    ("q" * 60 + "/" + "r" * 80 + ".jpg", b"fits the ustar prefix"),
]


def test_webdataset_shard_is_read_as_webdataset_reads_it(tmp_path):
    samples, err = assert_same(webdataset_shard(tmp_path))
    assert err is None and [s["__key__"] for s in samples] == [f"s{i:03d}" for i in range(6)]
    assert samples[0]["json"] == b"" and samples[3]["seg.png"] == b"\x89PNG" * 3


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_long_names_directories_links_and_odd_names(fmt):
    data = tar_bytes(MEMBERS, fmt, pax_headers={"comment": "a global header"} if fmt == tarfile.PAX_FORMAT else None)
    samples, err = assert_same(data)
    assert err is None
    keys = [s["__key__"] for s in samples]
    assert keys == ["dir/x1", LONG, "é/ünïcode", "y", "z", "y", "q" * 60 + "/" + "r" * 80]
    assert samples[0] == {
        "__key__": "dir/x1",
        "__url__": URL,
        "jpg": b"jpeg-1",
        "txt": b"upper-case suffix",
        "tar.gz": b"multi-dot suffix",
    }


def test_ustar_prefix_names():
    data = tar_bytes([("q" * 60 + "/" + "r" * 80 + ".jpg", b"x"), ("q" * 60 + "/" + "r" * 80 + ".txt", b"t")])
    ustar = tar_bytes([("q" * 60 + "/" + "r" * 80 + ".jpg", b"x")], tarfile.USTAR_FORMAT)
    assert ustar[345:350] == b"qqqqq", "the name is split into the ustar prefix field"
    assert_same(data)
    samples, err = assert_same(ustar)
    assert err is None and samples[0]["__key__"] == "q" * 60 + "/" + "r" * 80


def test_members_larger_than_one_read_and_many_small_ones():
    big = bytes(range(256)) * (3 * 4096 + 7)  # 3 MiB and a bit: spans several of the reader's 1 MiB reads
    members = [(f"k{i:04d}.txt", f"{i}".encode()) for i in range(3000)]
    members[1500:1500] = [("big.jpg", big), ("big.txt", b"caption")]
    samples, err = assert_same(tar_bytes(members))
    assert err is None and len(samples) == 3001
    assert next(s for s in samples if s["__key__"] == "big")["jpg"] == big


def test_short_reads_from_the_stream_give_the_same_samples(tmp_path):
    class Trickle(io.RawIOBase):
        """A pipe or socket: each read returns at most 100 bytes."""

        def __init__(self, data: bytes):
            self.data = io.BytesIO(data)

        def readable(self):
            return True

        def read(self, n=-1):
            return self.data.read(min(n, 100) if n >= 0 else 100)

    data = webdataset_shard(tmp_path)
    assert_same(data, Trickle(data))


def test_compressed_shards_as_tarfile_reads_them(tmp_path):
    data = webdataset_shard(tmp_path)
    samples, err = assert_same(gzip.compress(data))
    assert err is None and len(samples) == 6


def test_every_cut_of_a_shard_loses_what_webdataset_loses(tmp_path):
    """A shard cut short at any byte: the same samples as webdataset; an error wherever tarfile raises one (cut in
    a member's data or padding), and a named TarHeaderError where tarfile would end quietly (cut in a header)."""
    data = webdataset_shard(tmp_path, n=4)
    cuts = sorted({*range(0, len(data), 37), *(b + d for b in range(0, len(data), 512) for d in (-1, 0, 1))})
    kinds = set()
    for cut in cuts:
        if 0 <= cut < len(data):
            _, err = assert_same(data[:cut])
            kinds.add(type(err).__name__)
    assert kinds == {"NoneType", "TarFormatError", "TarHeaderError"}, kinds


def test_cut_in_a_member_is_an_error_and_drops_the_sample_being_gathered(tmp_path):
    data = webdataset_shard(tmp_path, n=4)
    second_jpg = data.index(b"s001.jpg") + 512 + 100  # 100 bytes into the second sample's image
    samples, err = assert_same(data[:second_jpg])
    assert isinstance(err, tar.TarFormatError) and "unexpected end of data in s001.jpg" in str(err)
    # webdataset only hands on s000 once a file of s001 is whole; the stream drops the group held at an error.
    assert samples == []
    third = data.index(b"s002.jpg") + 512 + 100
    samples, err = assert_same(data[:third])
    assert [s["__key__"] for s in samples] == ["s000"]


def test_corrupt_header_checksum(tmp_path):
    data = bytearray(webdataset_shard(tmp_path, n=4))
    first = bytearray(data)
    first[0] ^= 0x40  # the first member's name: the checksum no longer matches
    samples, err = assert_same(bytes(first))
    assert samples == [] and "bad checksum at byte 0" in str(err) and tarfile_raises(bytes(first))
    plain = bytearray(tar_bytes([(f"s{i:03d}.{ext}", b"x" * 600) for i in range(4) for ext in ("jpg", "txt")]))
    at = plain.index(b"s002.txt")
    plain[at] ^= 0x40
    samples, err = assert_same(bytes(plain))
    # tarfile stops there without an error (webdataset hands on s000, s001 and the s002 it holds); we name it.
    assert not tarfile_raises(bytes(plain))
    assert [s["__key__"] for s in samples] == ["s000", "s001", "s002"] and "txt" not in samples[2]
    assert isinstance(err, tar.TarHeaderError) and f"bad checksum at byte {at}" in str(err)
    # Written by webdataset, each member follows a pax header: a bad header after one is an error for tarfile too.
    at = data.index(b"s002.txt")
    data[at] ^= 0x40
    samples, err = assert_same(bytes(data))
    assert tarfile_raises(bytes(data)) and [s["__key__"] for s in samples] == ["s000", "s001"]
    assert isinstance(err, tar.TarFormatError) and not isinstance(err, tar.TarHeaderError)


def test_garbage_number_field_is_a_bad_header():
    data = bytearray(tar_bytes([("a.jpg", b"x"), ("b.jpg", b"y")]))
    data[512 * 2 + 100 : 512 * 2 + 108] = b"9999999\0"  # b.jpg's mode: not octal; fix the checksum as a writer would
    data[512 * 2 + 148 : 512 * 2 + 156] = b" " * 8
    data[512 * 2 + 148 : 512 * 2 + 156] = b"%06o\0 " % sum(data[512 * 2 : 512 * 3])
    samples, err = assert_same(bytes(data))
    assert [s["__key__"] for s in samples] == ["a"] and "invalid header" in str(err)


def test_empty_and_non_tar_streams_are_errors_and_an_empty_archive_is_not():
    for data in (b"", b"<html>404 Not Found</html>", b"x" * 600):
        samples, err = assert_same(data)
        assert samples == [] and isinstance(err, tarfile.ReadError) and tarfile_raises(data)
    samples, err = assert_same(tar_bytes([]))
    assert samples == [] and err is None


def test_long_name_header_followed_by_nothing_is_an_error():
    data = tar_bytes([("a.jpg", b"x"), (LONG + ".jpg", b"y")])
    cut = data.index(b"././@LongLink") + 1024  # the long-name header and its name block, not the member's header
    samples, err = assert_same(data[:cut])
    assert isinstance(err, tar.TarFormatError) and not isinstance(err, tar.TarHeaderError) and samples == []


def test_duplicate_suffix_in_one_sample_is_an_error():
    samples, err = assert_same(tar_bytes([("a.jpg", b"1"), ("a.txt", b"2"), ("b.jpg", b"3"), ("b.jpg", b"4")]))
    assert isinstance(err, ValueError) and "duplicate" in str(err) and [s["__key__"] for s in samples] == ["a"]


def test_pax_size_and_base256_sizes():
    """A pax ``size`` record and a GNU base-256 size field (tarfile writes one above 8 GiB) are read as tarfile reads
    them; here on small members, with the headers edited and re-checksummed."""
    data = bytearray(tar_bytes([("a.jpg", b"0123456789"), ("a.txt", b"t")]))
    data[124:136] = b"\x80" + (10).to_bytes(11, "big")
    data[148:156] = b" " * 8
    data[148:156] = b"%06o\0 " % sum(data[0:512])
    samples, err = assert_same(bytes(data))
    assert err is None and samples[0]["jpg"] == b"0123456789"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("p.jpg")
        info.size = 5
        info.pax_headers = {"size": "5", "path": "renamed/p.jpg"}
        tf.addfile(info, io.BytesIO(b"hello"))
    samples, err = assert_same(buf.getvalue())
    assert err is None and samples == [{"__key__": "renamed/p", "__url__": URL, "jpg": b"hello"}]


def test_loader_names_a_bad_header_as_the_cause_of_the_samples_lost(tmp_path, tokenizer):
    """A bad header in the middle of a shard: the samples before it are trained on, the rest of the shard is counted
    as lost, and the error names the bad header (tarfile ended the archive there quietly: "shard ended early")."""
    from medclip_train.data.stream import DataError
    from tests.shardkit import make_shards, shard_pattern
    from tests.training.test_datamodule import make_dm

    (path,) = make_shards(tmp_path, [24])
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tf:
        at = next(m.offset for m in tf.getmembers() if m.name == "train_000012.jpg")
    data[at] ^= 0x40
    path.write_bytes(bytes(data))
    dm = make_dm(tokenizer, shard_pattern([path]), max_skip_fraction=0.9, shuffle_buffer=0)
    batches = list(dm.train_dataloader())
    keys = [k for b in batches for k in b["key"]]
    assert set(keys) == {f"train_{i:06d}" for i in range(12)}
    assert sum(int(b["skipped"]) for b in batches) == 12
    loader = dm.train_dataloader()
    loader.dataset.spec.max_skip_fraction = 0.1
    loader.dataset.spec.min_samples_for_skip_check = 10
    with pytest.raises(DataError, match=f"train-000000.tar: TarHeaderError: bad checksum at byte {at}"):
        list(loader)
