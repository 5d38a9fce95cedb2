"""Checkpoints mirrored to object storage (``--checkpoint.remote_dir s3://bucket/runs/NAME``, any fsspec URL).

Checkpoints are written to the local run folder as always, then uploaded by global rank zero. S3 has no atomic
rename, so "the file under the final name is complete" cannot be had there the way ``os.replace`` gives it on a
disk, and a reader must not trust an object merely because it exists. Instead:

1. each checkpoint is uploaded under its own key, ``step{STEP:07d}-{SHA256[:12]}.ckpt``, which never holds other
   bytes (no upload ever overwrites an object that a manifest names);
2. only once it is whole (its size read back), ``latest.json`` is rewritten in one small PUT: ``step``, ``key``,
   ``size``, ``sha256`` of it, and the entries of the few checkpoints before it (``previous``);
3. ``config.yaml``, ``metrics*.csv`` and ``summary.json`` are copied after it (and at the end of the run).

A reader (``--ckpt_path last``) takes the newest entry whose object has the manifest's size and sha256, checked
while it downloads. A process killed mid-upload leaves the previous manifest, which names complete objects only.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import posixpath
import sys
import tempfile
import time

from medclip_train.data.sources import redact

MANIFEST = "latest.json"
KEEP_PREVIOUS = 4  # older entries a reader can fall back to when the newest object is missing or damaged
RUN_FILES = ("config.yaml", "summary.json", "metrics*.csv")
_CHUNK = 8 << 20


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class RemoteRunDir:
    """The remote copy of a run folder: checkpoint objects, ``latest.json`` and the run's small files."""

    def __init__(self, url: str):
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)

    def _key(self, name: str) -> str:
        return posixpath.join(self.root, name)

    def where(self, name: str = "") -> str:
        """``name`` under the remote folder, as printed (credentials and query masked)."""
        return redact(f"{self.url}/{name}" if name else self.url)

    def read_manifest(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self._key(MANIFEST)))
        except FileNotFoundError:
            return None

    def upload_checkpoint(self, path: str, step: int) -> dict:
        """Upload ``path`` (the checkpoint of ``step``), then point ``latest.json`` at it; returns its entry."""
        size, sha = os.path.getsize(path), sha256_file(path)
        entry = {"step": int(step), "key": f"step{int(step):07d}-{sha[:12]}.ckpt", "size": size, "sha256": sha}
        self.fs.put_file(path, self._key(entry["key"]))
        self.fs.invalidate_cache()
        stored = self.fs.info(self._key(entry["key"]))["size"]
        if stored != size:
            raise OSError(f"{self.where(entry['key'])}: {stored} bytes stored of {size}; latest.json left as it was")
        before = self.read_manifest() or {}
        history = [before, *before.get("previous", [])] if before.get("key") else []
        entry["previous"] = [_entry(e) for e in history if e.get("key") != entry["key"]][:KEEP_PREVIOUS]
        entry["written"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.fs.pipe_file(self._key(MANIFEST), json.dumps(entry, indent=1).encode())
        return entry

    def upload_run_files(self, folder: str) -> None:
        """``config.yaml``, ``metrics*.csv`` and ``summary.json`` of the local run folder, as they are now."""
        for pattern in RUN_FILES:
            for path in sorted(glob.glob(os.path.join(folder, pattern))):
                self.fs.put_file(path, self._key(os.path.basename(path)))

    def download_run_files(self, folder: str) -> list[str]:
        """The remote ``metrics*.csv`` a local folder lacks (a run resumed into an empty folder keeps its history)."""
        got = []
        for key in self.fs.glob(self._key("metrics*.csv")):
            target = os.path.join(folder, posixpath.basename(key))
            if not os.path.exists(target):
                self.fs.get_file(key, target)
                got.append(target)
        return got

    def fetch_latest(self, folder: str, local_step: int | None = None) -> str | None:
        """The newest complete remote checkpoint as a local file in ``folder`` (downloaded and verified), or None
        when there is no manifest or the local checkpoint (at ``local_step``) is as new.

        An entry whose object is missing or has another size or sha256 is skipped with a warning, for the one
        before it; none complete raises ``FileNotFoundError`` naming the manifest.
        """
        self.fs.invalidate_cache()  # sizes listed before another process's upload would be stale
        manifest = self.read_manifest()
        if manifest is None:
            return None
        problems = []
        for entry in [manifest, *manifest.get("previous", [])]:
            if local_step is not None and entry["step"] <= local_step:
                return None
            target = os.path.join(folder, entry["key"])
            if os.path.isfile(target) and os.path.getsize(target) == entry["size"]:
                if sha256_file(target) == entry["sha256"]:
                    return target
            problem = self._download_verified(entry, target)
            if problem is None:
                for skipped in problems:
                    print(f"warning: {skipped}; resuming from step {entry['step']} instead", file=sys.stderr)
                return target
            problems.append(problem)
        raise FileNotFoundError(
            f"{self.where(MANIFEST)}: no complete checkpoint among its {len(problems)} entries ({problems[0]}); "
            f"pass --ckpt_path FILE to resume from a checkpoint of your choice"
        )

    def _download_verified(self, entry: dict, target: str) -> str | None:
        """Download ``entry``'s object to ``target`` through a temporary file; the problem found, or None."""
        where = self.where(entry["key"])
        try:
            size = self.fs.info(self._key(entry["key"]))["size"]
        except FileNotFoundError:
            return f"{where} is missing"
        if size != entry["size"]:
            return f"{where} has {size} bytes, latest.json says {entry['size']}"
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        # Named like AtomicCheckpointIO's temporaries: a crash mid-download leaves one the next run removes.
        fd, tmp = tempfile.mkstemp(
            dir=os.path.dirname(os.path.abspath(target)), prefix=f".{entry['key']}.", suffix=".tmp"
        )
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, self.fs.open(self._key(entry["key"]), "rb") as src:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            if digest.hexdigest() != entry["sha256"]:
                return f"{where} does not have the sha256 latest.json gives"
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
            return None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)


def _entry(entry: dict) -> dict:
    return {k: entry[k] for k in ("step", "key", "size", "sha256") if k in entry}


def resolve_last(remote_dir: str, folder: str, restore_run_files: bool) -> str:
    """``--ckpt_path last`` with ``checkpoint.remote_dir``: ``"last"`` (Lightning's local rule) when the local
    ``last.ckpt`` is as new as the remote manifest or there is none, else the path of the remote checkpoint,
    downloaded into ``folder`` and verified. ``restore_run_files``: also fetch the ``metrics*.csv`` the folder
    lacks (the launcher's rank zero, which holds the folder's lock)."""
    from medclip_train.resume import read_resume_state, resolve_checkpoint

    local = resolve_checkpoint("last", folder)
    local_step = read_resume_state(local)["global_step"] if local else None
    remote = RemoteRunDir(remote_dir)
    fetched = remote.fetch_latest(folder, local_step)
    if fetched is None:
        return "last"
    if restore_run_files:
        remote.download_run_files(folder)
    print(
        f"resuming from {remote.where(os.path.basename(fetched))} (newer than the run folder's last.ckpt)",
        file=sys.stderr,
    )
    return fetched
