"""Files that either do not exist under their name or are complete: written under a temporary name, then renamed.

A crash, a kill or a full disk during the write leaves the previous file (or none), never half of one: the data is
written to a temporary file in the same folder (a rename is atomic only within one filesystem), flushed and
fsynced, then moved over the final name with ``os.replace``. Used by the shard writer and its manifests
(data_prep), the checkpoint writer and the feature cache, so it lives below every layer.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


class AtomicFile:
    """An open file that becomes ``path`` on :meth:`commit` and disappears on :meth:`abort`.

    As a context manager it yields the file object and commits when the block ends without an exception, else
    aborts. For a file written over many calls (a shard, a log), keep the object and call the two methods.

    Args:
        path: the final name.
        mode: ``open`` mode, ``"wb"`` or ``"w"``.
        unique: temporary name ``.NAME.XXXXXXXX.tmp`` (``mkstemp``), for writers that may run at the same time
            (another process saving the same checkpoint or cache entry); default ``NAME.tmp``, a name that
            medclip-prep's output checks recognise.
        buffering, encoding: as for ``open``. ``buffering=0`` (binary only) makes a failed write (a full disk)
            raise once, not again from a buffered file's close.
    """

    def __init__(
        self, path: str | Path, mode: str = "wb", unique: bool = False, buffering: int = -1, encoding: str | None = None
    ):
        self.path = Path(path)
        if unique:
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            self.tmp = Path(tmp)
            self.file = os.fdopen(fd, mode, buffering, encoding=encoding)
        else:
            self.tmp = self.path.with_name(self.path.name + ".tmp")
            self.file = open(self.tmp, mode, buffering, encoding=encoding)
        self._unique = unique

    def commit(self) -> None:
        """Flush, fsync and close the file, then rename it to ``path``; on failure the temporary file is removed."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            if self._unique:  # mkstemp creates 0600; the file gets the permissions open() would have given it
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(self.tmp, 0o666 & ~umask)
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Close the file and remove it; ``path`` is left as it was."""
        # A buffered file's close flushes, which fails again on a full disk; the descriptor is closed all the same.
        with contextlib.suppress(OSError):
            self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``path`` so that it either does not exist or is complete (tmp file, fsync, rename)."""
    with AtomicFile(path, "wb", buffering=0) as f:
        view = memoryview(data)
        while view:  # an unbuffered write may take part of the data
            view = view[f.write(view) :]


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """:func:`atomic_write_bytes` for a JSON document (indented, UTF-8, final newline)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
