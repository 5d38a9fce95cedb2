"""ROCO (Radiology Objects in COntext), v1 GitHub release and the Kaggle repackaging.

GitHub release (``razorx89/roco-dataset``), per ``data/{train,validation,test}/{radiology,non-radiology}/``:

- ``captions.txt``: ``ROCO_00020<TAB> caption`` (one tab; the caption starts with a space, which is stripped)
- ``cuis.txt``, ``keywords.txt``, ``semtypes.txt``: ``ROCO_ID<TAB><TAB>v1<TAB>v2...``; semtypes alternate code, name
- ``dlinks.txt``: ``ROCO_ID<TAB>wget -r ftp://.../PMC3970251.tar.gz -P /path/to/Dir<TAB>image.jpg``
- ``licences.txt``: CSV ``ROCO_ID,PMC_ID,CC``
- images after download: ``images/<ROCO_ID>.jpg``, or ``images/<PMCID>_<image.jpg>`` as the release's own
  ``scripts/fetch.py`` names them; both are looked up.

Later commits of the repository renamed some files (``captions_fp_test_revised.txt``...): a missing ``captions.txt``
falls back to the single ``captions*.txt`` in the folder, and likewise for the other files.

Kaggle repackaging: ``{train,validation,test}/radiology{train,val,test}data.csv`` with ``id,name,caption`` and images at
``<split>/radiology/images/<name>`` (likewise ``nonradiology...`` / ``non-radiology``).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from pathlib import Path

from data_prep.records import PrepError, Reason, Record, RecordRejected, Rejection, safe_join

SOURCE = "roco"
SPLITS = {"train": "train", "validation": "val", "test": "test"}
CLASSES = ("radiology", "non-radiology")
_KAGGLE_CSV = re.compile(r"(non-?radiology|radiology)(train|val|validation|test)data\.csv", re.IGNORECASE)


def find_layout(root: Path) -> tuple[str, Path]:
    """Locate the release under ``root`` (the repository, its ``data/``, or Kaggle's ``all_data/``).

    Returns:
        ``("github", base)`` or ``("kaggle", base)`` where ``base`` holds the split folders.

    Raises:
        PrepError: when neither layout is found.
    """
    if not root.is_dir():
        raise PrepError(f"ROCO input folder {root} does not exist")
    for base in (root, root / "data", root / "all_data"):
        if any(_find_file(base / s / c, "captions") for s in SPLITS for c in CLASSES):
            return "github", base
        if any(_KAGGLE_CSV.fullmatch(p.name) for s in SPLITS if (base / s).is_dir() for p in (base / s).iterdir()):
            return "kaggle", base
    raise PrepError(
        f"no ROCO captions found under {root}: expected data/<split>/<class>/captions.txt "
        "(GitHub release) or <split>/radiology<split>data.csv (Kaggle)"
    )


def read_records(root: Path, images_subdir: str = "images") -> Iterator[Record | Rejection]:
    """Records of one release: one per caption line (GitHub) or CSV row (Kaggle), in split, class, file order.

    The layout (and Kaggle CSV headers) are checked now, so bad input fails before the output folder is touched.
    """
    layout, base = find_layout(root)
    if layout == "kaggle":
        csv_files = list(_kaggle_files(base))
        for csv_path, _, _ in csv_files:
            _check_kaggle_header(csv_path)
        return (r for path, split, cls in csv_files for r in _read_kaggle_csv(path, split, cls, images_subdir))
    folders = [(base / d / c, split, c) for d, split in SPLITS.items() for c in CLASSES]
    found = [f for f in folders if _find_file(f[0], "captions")]
    return (r for folder, split, cls in found for r in _read_class_folder(folder, split, cls, images_subdir))


def _find_file(folder: Path, stem: str, suffix: str = ".txt") -> Path | None:
    """``folder/stem.txt``, else the single ``stem*.txt`` (renamed files of later commits)."""
    exact = folder / f"{stem}{suffix}"
    if exact.is_file():
        return exact
    if not folder.is_dir():
        return None
    matches = sorted(folder.glob(f"{stem}*{suffix}"))
    return matches[0] if len(matches) == 1 else None


def _read_class_folder(folder: Path, split: str, cls: str, images_subdir: str) -> Iterator[Record | Rejection]:
    captions_file = _find_file(folder, "captions")
    cuis = _read_tab_lists(_find_file(folder, "cuis"))
    keywords = _read_tab_lists(_find_file(folder, "keywords"))
    semtypes = _read_tab_lists(_find_file(folder, "semtypes"))
    dlinks = _read_dlinks(_find_file(folder, "dlinks"))
    licences = _read_licences(_find_file(folder, "licences"))
    images = folder / images_subdir
    with open(captions_file, "rb") as f:
        for number, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue  # blank line (e.g. a trailing newline), not a record
            if b"\t" not in raw:
                rid = raw[:40].decode("utf-8", "replace")
                yield Rejection(SOURCE, rid, str(captions_file), Reason.MALFORMED_RECORD, "no tab", number, split)
                continue
            rid_bytes, caption = raw.split(b"\t", 1)
            rid = rid_bytes.decode("utf-8", "replace").strip()
            meta = _meta(rid, cls, cuis, keywords, semtypes, dlinks, licences)
            try:
                image = _image_path(images, rid, dlinks.get(rid))
            except RecordRejected as e:
                yield Rejection(SOURCE, rid, str(captions_file), e.reason, e.detail, number, split)
                continue
            yield Record(SOURCE, rid, split, caption, image, str(captions_file), meta, number)


def _meta(rid, cls, cuis, keywords, semtypes, dlinks, licences) -> dict:
    types = semtypes.get(rid, [])
    meta = {
        "modality": cls,
        "cuis": cuis.get(rid, []),
        "labels": [],
        "licence": None,
        "keywords": keywords.get(rid, []),
        # semtypes.txt alternates code and name: T046, Pathologic Function, T061, ...
        "semtypes": [{"code": c, "name": n} for c, n in zip(types[::2], types[1::2])],
    }
    if rid in licences:
        pmc_image, licence = licences[rid]
        meta["licence"] = licence
        meta["pmc_image"] = pmc_image
    if rid in dlinks:
        url, name = dlinks[rid]
        meta["pmcid"] = _pmcid_from_url(url)
        meta["download_url"] = url
        meta["image_name"] = name
    return meta


def _image_path(images: Path, rid: str, dlink: tuple[str, str] | None) -> Path:
    """``images/<ROCO_ID>.jpg`` if present, else the ``<PMCID>_<name>`` that the release's fetch.py writes."""
    by_id = safe_join(images, f"{rid}.jpg")
    if by_id.is_file() or dlink is None:
        return by_id
    by_fetch = safe_join(images, f"{_pmcid_from_url(dlink[0])}_{dlink[1]}")
    return by_fetch if by_fetch.is_file() else by_id


def _pmcid_from_url(url: str) -> str:
    """``ftp://.../PMC3970251.tar.gz`` -> ``PMC3970251``."""
    name = url.rsplit("/", 1)[-1]
    return name[: -len(".tar.gz")] if name.endswith(".tar.gz") else name


def _read_tab_lists(path: Path | None) -> dict[str, list[str]]:
    """``ID<TAB><TAB>v1<TAB>v2`` lines -> ``{ID: [v1, v2]}`` (empty fields dropped: the release puts two tabs)."""
    if path is None:
        return {}
    out: dict[str, list[str]] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.rstrip("\r\n").split("\t")
            if fields[0].strip():
                out[fields[0].strip()] = [v.strip() for v in fields[1:] if v.strip()]
    return out


def _read_dlinks(path: Path | None) -> dict[str, tuple[str, str]]:
    """``ID<TAB>wget -r URL -P /path/to/Dir<TAB>image.jpg`` -> ``{ID: (URL, image.jpg)}``."""
    if path is None:
        return {}
    out = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.rstrip("\r\n").split("\t")
            if len(fields) >= 3:
                url = next((w for w in fields[1].split() if "://" in w), fields[1].strip())
                out[fields[0].strip()] = (url, fields[-1].strip())
    return out


def _read_licences(path: Path | None) -> dict[str, tuple[str, str]]:
    """``licences.txt`` (CSV ``ROCO_ID,PMC_ID,CC``) -> ``{ROCO_ID: (PMC_ID, CC)}``."""
    if path is None:
        return {}
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        rows = csv.DictReader(f)
        return {r["ROCO_ID"].strip(): (r["PMC_ID"].strip(), r["CC"].strip()) for r in rows if r.get("ROCO_ID")}


def _kaggle_files(base: Path) -> Iterator[tuple[Path, str, str]]:
    for split_dir, split in SPLITS.items():
        folder = base / split_dir
        if folder.is_dir():
            for csv_path in sorted(p for p in folder.iterdir() if _KAGGLE_CSV.fullmatch(p.name)):
                yield csv_path, split, "non-radiology" if csv_path.name.lower().startswith("non") else "radiology"


def _check_kaggle_header(csv_path: Path) -> None:
    with open(csv_path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        header = next(csv.reader(f), [])
    missing = {"id", "name", "caption"} - set(header)
    if missing:
        raise PrepError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))}")


def _read_kaggle_csv(csv_path: Path, split: str, cls: str, images_subdir: str) -> Iterator[Record | Rejection]:
    folder = csv_path.parent
    candidates = [folder / c / images_subdir for c in ((cls, cls.replace("-", "")) if "-" in cls else (cls,))]
    images = next((c for c in candidates if c.is_dir()), candidates[0])
    src = str(csv_path)
    with open(csv_path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        for row in reader:
            rid, name, caption = row["id"], row["name"], row["caption"]
            if rid is None or name is None:
                yield Rejection(SOURCE, rid, src, Reason.MALFORMED_RECORD, "short row", reader.line_num, split)
                continue
            rid = rid.strip()
            try:
                image = safe_join(images, name.strip())
            except RecordRejected as e:
                yield Rejection(SOURCE, rid, src, e.reason, e.detail, reader.line_num, split)
                continue
            meta = {"modality": cls, "cuis": [], "labels": [], "image_name": name.strip()}
            yield Record(SOURCE, rid, split, caption, image, src, meta, reader.line_num)
