"""A shard's samples: tar members grouped by key, as webdataset's ``group_by_keys(tar_file_expander(...))`` gives them.

webdataset reads a shard through ``tarfile`` in stream mode, which parses every header field in Python, builds a
``TarInfo`` per member and reads through many small buffered reads: 0.15-0.17 ms per sample in a loader worker whose
whole sample costs about 2.8 ms. A sample needs only each member's name and bytes, so here the 512-byte headers are
read straight from the stream in large reads, checked (checksum and number fields, as tarfile checks them) and only
name, size and type are kept.

What comes out, and where an error is raised, follows tarfile + webdataset (tests/training/test_tar.py compares them
on shards written by webdataset, by tarfile in GNU and pax formats, cut short and corrupted):

- names: ustar prefix + name, GNU long names (``L``), pax ``path`` from extended (``x``) and global (``g``) headers;
  directories, links and other non-regular members are skipped; pax ``size`` overrides the header's;
- files named ``__*__`` (webdataset's metadata) are skipped; a file is keyed by its path up to the first dot of its
  base name and its suffix (lower-cased) is the rest; names without a suffix are skipped; consecutive files with the
  same key form one sample (``__key__``, ``__url__``); a suffix seen twice in one sample is a ``ValueError``;
- the archive ends at the first all-zero block or at the end of the stream on a block boundary;
- a stream cut inside a member's data or padding, a bad header at the start of the stream or after a long-name or
  pax header raise ``TarFormatError`` (a ``tarfile.ReadError``), and the sample being gathered is not handed on
  (webdataset's handler stops there and the stream drops the group it was holding);
- gzip, bzip2 and xz compressed shards are read through their decompressor, as ``tarfile``'s ``r|*`` does.

One deliberate difference: a bad or cut header later in the stream ends tarfile's iteration silently, as if the
archive ended there; here the sample gathered so far is handed on as tarfile would, and then ``TarHeaderError`` is
raised, so the lost rest of the shard is reported with its cause instead of as a shard that ended early. GNU sparse
members, which no shard writer makes, are refused with a ``TarFormatError``.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import struct
import sys
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

BLOCK = 512
_READ = 1 << 20
"""Bytes asked of the stream per read: one read covers many small members."""
_ZEROS = bytes(BLOCK)
_ENCODING = sys.getfilesystemencoding()  # tarfile's default for names, with surrogateescape
_REGULAR = frozenset((b"0", b"\0", b"7"))
_SUPPORTED = frozenset((b"0", b"\0", b"1", b"2", b"5", b"6", b"7", b"3", b"4", b"L", b"K", b"S"))
"""tarfile's SUPPORTED_TYPES: the data of a type outside them is skipped like a regular file's."""
_EXTENSIONS = frozenset((b"L", b"K", b"x", b"X", b"g"))
_NUMBER_FIELDS = ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))
"""mode, uid, gid, mtime, devmajor, devminor: unused, but tarfile refuses a header where one is not a number."""
_OCTAL = re.compile(rb" *[0-7]* *(?:\0.*)?", re.DOTALL)
"""A number field tarfile.nti accepts (spaces and octal digits up to a NUL, anything after it)."""
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator skip_meta
_KEY_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


class TarFormatError(tarfile.ReadError):
    """The shard is not a readable tar from here on (bad header, data cut short); the message says where."""


class TarHeaderError(TarFormatError):
    """A bad or cut header after the first member, where tarfile would end the archive without an error."""


class _BadHeader(Exception):
    pass


def samples(stream: BinaryIO, url: str) -> Iterator[dict]:
    """The samples of one shard, in order: ``{"__key__": ..., "__url__": url, suffix: bytes, ...}``."""
    held: dict | None = None
    try:
        for name, data in _files(stream):
            if ("/" not in name and name.startswith("__") and name.endswith("__")) or _SKIP_META.match(name):
                continue
            match = _KEY_SUFFIX.match(name)
            if match is None:
                continue
            key, suffix = match.group(1), match.group(2).lower()
            if held is None or key != held["__key__"]:
                if held is not None:
                    yield held
                held = {"__key__": key, "__url__": url}
            if suffix in held:
                raise ValueError(f"{name}: duplicate file name in tar file {suffix} {list(held)}")
            held[suffix] = data
    except TarHeaderError:
        # tarfile would end the archive here and webdataset hand on the group it holds; so do we, then report.
        if held is not None:
            yield held
        raise
    if held is not None:
        yield held


def _files(stream: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular member."""
    reader = _Reader(stream)
    pax_global: dict[str, str] = {}
    pad = 0  # padding after the previous member's data, consumed when the next header is read
    while True:
        if pad and len(reader.read(pad)) < pad:
            raise TarFormatError(f"unexpected end of data before byte {reader.offset + pad}")
        at = reader.offset
        buf = reader.read(BLOCK)
        try:
            header = _header(buf)
        except _BadHeader as err:
            if at == 0:
                raise TarFormatError(f"{err} at byte 0: not a tar archive") from None
            if not buf:
                return  # the stream ends on a block boundary: tarfile takes that as the end of the archive
            raise TarHeaderError(f"{err} at byte {at}") from None
        if header is None:
            return  # end-of-archive block
        name, size, kind = header
        extensions = []  # (type, payload, pax records in force) of long-name and pax headers, in stream order
        while kind in _EXTENSIONS:
            payload = reader.read(_padded(size))
            records = None
            if kind in (b"x", b"X"):
                records = {**pax_global, **_pax_records(payload, at)}
            elif kind == b"g":
                pax_global.update(_pax_records(payload, at))
            extensions.append((kind, payload, records))
            buf = reader.read(BLOCK)
            try:
                header = _header(buf)
                if header is None:
                    raise _BadHeader("end of file header")
            except _BadHeader as err:
                raise TarFormatError(f"{err} after the extended header at byte {at}") from None
            name, size, kind = header
        if kind == b"S":
            raise TarFormatError(f"{name}: GNU sparse members are not supported (at byte {at})")
        # tarfile applies the global pax records, then each extension header from the innermost out.
        name, size = _apply_pax(pax_global, name, size)
        for ext_kind, payload, records in reversed(extensions):
            if ext_kind == b"L":
                name = _nts(payload)
            elif records is not None:
                name, size = _apply_pax(records, name, size)
        if kind in _REGULAR:
            data = reader.read(size)
            if len(data) < size:
                raise TarFormatError(f"unexpected end of data in {name} (member at byte {at})")
            pad = _padded(size) - size
            yield name, data
        elif kind not in _SUPPORTED:
            pad = _padded(size)  # tarfile skips an unknown type's data like a regular file's
        else:
            pad = 0  # directories, links, devices: tarfile reads no data after them


def _header(buf: bytes) -> tuple[str, int, bytes] | None:
    """(name, size, type) of a header block as tarfile.TarInfo.frombuf reads it; None for an all-zero block."""
    if len(buf) != BLOCK:
        raise _BadHeader("truncated header" if buf else "empty file")
    if buf == _ZEROS:
        return None
    checksum = _number(buf[148:156])
    if checksum != 256 + sum(buf) - sum(buf[148:156]) and checksum != 256 + sum(struct.unpack_from("148b8x356b", buf)):
        raise _BadHeader("bad checksum")
    size = _number(buf[124:136])
    for start, stop in _NUMBER_FIELDS:
        if _OCTAL.fullmatch(buf, start, stop) is None:  # the usual octal field, else as tarfile parses it
            _number(buf[start:stop])
    kind = buf[156:157]
    name = _nts(buf[0:100])
    if kind == b"\0" and name.endswith("/"):
        kind = b"5"  # an old V7 directory
    prefix = _nts(buf[345:500])
    if prefix and kind not in (b"L", b"K", b"S"):
        name = prefix + "/" + name
    return name, size, kind


def _number(field: bytes) -> int:
    """tarfile.nti: octal text, or base-256 (first byte 0x80 or 0xff) for numbers too large for it."""
    if field[0] in (0o200, 0o377):
        n = int.from_bytes(field[1:], "big")
        return n - 256 ** (len(field) - 1) if field[0] == 0o377 else n
    end = field.find(0)
    try:
        return int((field if end < 0 else field[:end]).decode("ascii").strip() or "0", 8)
    except ValueError:
        raise _BadHeader("invalid header") from None


def _nts(field: bytes) -> str:
    end = field.find(0)
    return (field if end < 0 else field[:end]).decode(_ENCODING, "surrogateescape")


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _pax_records(payload: bytes, at: int) -> dict[str, str]:
    """``"%d %s=%s\\n"`` records of a pax header, decoded as tarfile decodes them."""
    records, pos = {}, 0
    while (match := _PAX_RECORD.match(payload, pos)) is not None:
        length = int(match.group(1))
        if length == 0:
            # tarfile: InvalidHeaderError, which like a bad header ends the archive quietly after the first member
            raise (TarHeaderError if at else TarFormatError)(f"invalid pax header at byte {at}")
        value = payload[match.end(2) + 1 : match.start(1) + length - 1]
        records[_utf8(match.group(2))] = _utf8(value)
        pos += length
    if any(k.startswith("GNU.sparse.") for k in records):
        raise TarFormatError(f"GNU sparse members are not supported (pax header at byte {at})")
    return records


def _utf8(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode(_ENCODING, "surrogateescape")


def _apply_pax(records: dict[str, str], name: str, size: int) -> tuple[str, int]:
    if "path" in records:
        name = records["path"].rstrip("/")
    if "size" in records:
        try:
            size = int(records["size"])
        except ValueError:
            size = 0  # as tarfile
    return name, size


class _Reader:
    """Reads exact byte counts from a stream through large reads; knows its offset in the (decompressed) tar."""

    def __init__(self, stream: BinaryIO):
        head = stream.read(BLOCK) or b""
        # tarfile's r|* detection of a compressed stream from its first block.
        if head.startswith(b"\x1f\x8b\x08"):
            stream, head = gzip.GzipFile(fileobj=_Prefixed(head, stream)), b""
        elif head[0:3] == b"BZh" and head[4:10] == b"1AY&SY":
            stream, head = bz2.BZ2File(_Prefixed(head, stream)), b""
        elif head.startswith((b"\x5d\x00\x00\x80", b"\xfd7zXZ")):
            stream, head = lzma.LZMAFile(_Prefixed(head, stream)), b""
        self.stream = stream
        self.buf = head
        self.pos = 0
        self.offset = 0

    def read(self, n: int) -> bytes:
        """``n`` bytes, fewer only at the end of the stream."""
        buf, pos = self.buf, self.pos
        end = pos + n
        if end <= len(buf):
            self.pos = end
            self.offset += n
            return buf[pos:end]
        parts, have = [buf[pos:]], len(buf) - pos
        while have < n:
            chunk = self.stream.read(max(n - have, _READ))
            if not chunk:
                break
            parts.append(chunk)
            have += len(chunk)
        # The last read stays as the buffer; only the bytes asked for are copied out of it.
        keep = max(have - n, 0)
        last = parts[-1]
        self.buf, self.pos = last, len(last) - keep
        if keep:
            parts[-1] = last[: self.pos]
        out = b"".join(parts)
        self.offset += len(out)
        return out


class _Prefixed:
    """A stream that first returns ``head`` (bytes already read to detect the compression), then the rest."""

    def __init__(self, head: bytes, stream: BinaryIO):
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if self.head:
            out = self.head if n < 0 or n >= len(self.head) else self.head[:n]
            self.head = self.head[len(out) :]
            return out
        return self.stream.read(n)

    def readable(self) -> bool:
        return True
