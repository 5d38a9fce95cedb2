"""Where a converter finds the image a record names: a folder, or a ``.zip``/``.tar`` archive read in place.

Releases such as PMC-OA ship their images as one archive; reading members in place saves extracting millions of
files. Member names are never used as output paths, and a member whose name is absolute or climbs out with ``..``, or
that is a link (which could point anywhere on the machine), is refused: a record naming it is rejected as
``path_escape``, like a record path that escapes an image folder.
"""

from __future__ import annotations

import posixpath
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from data_prep.records import PrepError, Reason, RecordRejected, relative_parts, safe_join


@dataclass(frozen=True)
class TarMember:
    """A regular file inside an uncompressed tar, read by offset in the worker (no tar parsing per image)."""

    archive: str
    offset: int
    size: int

    def read_image_bytes(self) -> bytes:
        with open(self.archive, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.archive} ends inside a member (truncated archive)")
        return data


def _member_name(name: str) -> str | None:
    """Normalised member name, or ``None`` when it is absolute or leaves the archive root."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        return None
    normalised = posixpath.normpath(posix)
    if normalised == ".." or ".." in PurePosixPath(normalised).parts:
        return None
    return normalised


class FolderStore:
    """Images in a folder: ``locate`` joins the record's path, refusing escapes (see :func:`safe_join`)."""

    def __init__(self, root: Path):
        self.root = root

    def locate(self, name: str) -> Path:
        return safe_join(self.root, name)


class ArchiveStore:
    """Images in a ``.zip`` or uncompressed ``.tar``, indexed once by member name."""

    def __init__(self, path: Path):
        self.path = path
        self.members: dict[str, Any] = {}
        self.refused: dict[str, str] = {}  # member name -> why it cannot be read
        if zipfile.is_zipfile(path):
            self._zip: zipfile.ZipFile | None = zipfile.ZipFile(path)
            self._index_zip()
        else:
            self._zip = None
            self._index_tar()

    def _refuse(self, raw: str, why: str) -> None:
        self.refused[raw.replace("\\", "/")] = why

    def _index_zip(self) -> None:
        for info in self._zip.infolist():
            name = _member_name(info.filename)
            if name is None:
                self._refuse(info.filename, "member name leaves the archive")
            elif stat.S_ISLNK(info.external_attr >> 16):
                self._refuse(name, "member is a symbolic link")
            elif not info.is_dir():
                self.members[name] = info

    def _index_tar(self) -> None:
        try:
            with tarfile.open(self.path, "r:") as tar:  # "r:" = uncompressed only: members are read by offset
                for info in tar:
                    name = _member_name(info.name)
                    if name is None:
                        self._refuse(info.name, "member name leaves the archive")
                    elif info.issym() or info.islnk():
                        self._refuse(name, "member is a link")
                    elif info.isfile():
                        self.members[name] = TarMember(str(self.path), info.offset_data, info.size)
        except tarfile.ReadError as e:
            raise PrepError(f"{self.path}: not a .zip or uncompressed .tar archive ({e}); extract it first") from None

    def locate(self, name: str) -> bytes | TarMember:
        """The member a record names: bytes (zip, read here) or a :class:`TarMember` (read in the worker).

        Raises:
            RecordRejected: ``path_escape`` for escaping names and refused members, ``missing_image`` otherwise.
        """
        relative_parts(name, self.path)  # the lexical checks of folders; members are not files, links are refused
        key = _member_name(name)
        if key in self.refused or name in self.refused:
            raise RecordRejected(Reason.PATH_ESCAPE, f"{self.path}:{name}: {self.refused.get(key, 'refused')}")
        member = self.members.get(key)
        if member is None:
            raise RecordRejected(Reason.MISSING_IMAGE, f"{name} not in {self.path}")
        return self._zip.read(member) if self._zip is not None else member


def open_image_store(path: Path) -> FolderStore | ArchiveStore:
    """A store for ``path``: a folder, a ``.zip`` or an uncompressed ``.tar``.

    Raises:
        PrepError: when ``path`` does not exist or is a file of another kind.
    """
    if path.is_dir():
        return FolderStore(path)
    if path.is_file():
        return ArchiveStore(path)
    raise PrepError(f"image folder or archive {path} does not exist")
