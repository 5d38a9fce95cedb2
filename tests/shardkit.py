"""Write small WebDataset shards for tests, in the layout medclip-prep produces (tars + sizes.json + manifest).

Images are drawn so that captions are learnable: each class has its own colour and a bright disc whose side
matches the caption.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

CLASSES = {
    "xray": ((200, 200, 200), "chest x-ray"),
    "ct": ((70, 70, 70), "ct scan"),
    "mri": ((30, 30, 140), "mri"),
    "histology": ((220, 110, 190), "histology"),
}


def sample_bytes(cls: str, side: str, size: int = 96, fmt: str = "JPEG") -> bytes:
    colour, _ = CLASSES[cls]
    img = Image.new("RGB", (size, size), colour)
    x = size // 6 if side == "left" else size * 4 // 6
    ImageDraw.Draw(img).ellipse([x, size // 2 - 8, x + 16, size // 2 + 8], fill=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_shards(
    folder: Path,
    shard_sizes: list[int],
    split: str = "train",
    seed: int = 0,
    image_size: int = 96,
    corrupt: dict[int, str] | None = None,
    key_prefix: str | None = None,
) -> list[Path]:
    """Write ``{split}-NNNNNN.tar`` shards with the given sample counts; returns their paths.

    ``corrupt`` maps a global sample index to a fault: ``bad_jpeg`` (cut in half), ``garbage`` (random bytes as
    image), ``empty_caption``, ``non_utf8``, ``no_text``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    corrupt = corrupt or {}
    rng = random.Random(seed)
    sizes_path = folder / "sizes.json"
    sizes = json.loads(sizes_path.read_text()) if sizes_path.exists() else {}
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"label_counts": {}}
    counts = manifest["label_counts"].setdefault(split, {})
    paths, index = [], 0
    for shard_no, n in enumerate(shard_sizes):
        path = folder / f"{split}-{shard_no:06d}.tar"
        with tarfile.open(path, "w") as tf:
            for _ in range(n):
                cls, side = rng.choice(sorted(CLASSES)), rng.choice(["left", "right"])
                key = f"{key_prefix or split}_{index:06d}"
                image = sample_bytes(cls, side, image_size)
                caption = f"{CLASSES[cls][1]} with a nodule on the {side}".encode()
                fault = corrupt.get(index)
                if fault == "bad_jpeg":
                    image = image[: len(image) // 2]
                elif fault == "garbage":
                    image = bytes(rng.randrange(256) for _ in range(300))
                elif fault == "empty_caption":
                    caption = b"   "
                elif fault == "non_utf8":
                    caption = b"\xff\xfe caption \xc3\x28"
                labels = [f"modality:{cls}", f"side:{side}"]
                add_member(tf, f"{key}.jpg", image)
                if fault != "no_text":
                    add_member(tf, f"{key}.txt", caption)
                add_member(tf, f"{key}.json", json.dumps({"id": key, "labels": labels}).encode())
                for label in labels:
                    counts[label] = counts.get(label, 0) + 1
                index += 1
        sizes[path.name] = n
        paths.append(path)
    sizes_path.write_text(json.dumps(sizes))
    manifest_path.write_text(json.dumps(manifest))
    return paths


def shard_pattern(paths: list[Path]) -> str:
    folder, split = paths[0].parent, paths[0].name.split("-")[0]
    return str(folder / f"{split}-{{000000..{len(paths) - 1:06d}}}.tar")
