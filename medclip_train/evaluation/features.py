"""Encode images and texts with a frozen CLIP model, with an on-disk feature cache keyed by model and data.

The cache key hashes the model weights (or a given model id), the data fingerprint (file names, sizes, mtimes),
and the preprocessing or tokenizer settings, so a repeated evaluation of the same model on the same data never
re-encodes, and any change to one of them does.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torchvision import transforms
from tqdm import tqdm

from medclip_train.atomic_files import AtomicFile
from medclip_train.evaluation.datasets import collate
from medclip_train.evaluation.distributed import from_rank0, gather, rank, world_size

CACHE_VERSION = 1
"""Bumped when what is stored changes, so old cache files are not read back."""


class PixelTransform:
    """The eval transform up to the resized/cropped pixels, ending in a uint8 RGB (3, H, W) tensor.

    The loader workers then ship a quarter of the bytes of float32, and the float work (``ToTensor`` + ``Normalize``)
    runs once per batch where the model runs (:func:`normalize_batch`), in the same operations, so the features are
    bit-identical to the float transform's. ``keeps_grey``: a greyscale (``L``) image may enter as it is and becomes
    RGB after the resize: a resize works on each band alike, so the pixels are those of resizing its RGB copy, at a
    third of the work (most medical images are greyscale).
    """

    keeps_grey = True

    def __init__(self, steps: list, mean, std):
        self.steps, self.mean, self.std = steps, tuple(float(m) for m in mean), tuple(float(s) for s in std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        for step in self.steps:
            image = step(image)
        if image.mode == "L":  # RGB repeats the grey value: a (3, H, W) view, made one array by the batch's stack
            return torch.from_numpy(np.array(image)).expand(3, -1, -1)
        if image.mode != "RGB":
            image = image.convert("RGB")
        return transforms.functional.pil_to_tensor(image)

    def __repr__(self) -> str:
        return f"PixelTransform({self.steps}, mean={self.mean}, std={self.std})"


PIXEL_STEPS = {"Resize", "CenterCrop", "MaybeConvertMode", "_convert_to_rgb", "ResizeKeepRatio", "CenterCropOrPad"}
"""Steps of open_clip's eval transforms (all work on each band alike and pad with 0)."""


def pixel_transform(preprocess) -> PixelTransform | None:
    """``preprocess`` (a torchvision Compose ending in ToTensor + Normalize, as open_clip's eval transforms do) without
    that tail; ``None`` for any other transform, which then runs as it is."""
    steps = list(getattr(preprocess, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-1], transforms.Normalize):
        return None
    if type(steps[-2]).__name__ not in ("ToTensor", "MaybeToTensor"):
        return None
    if any(_name(step) not in PIXEL_STEPS for step in steps[:-2]):
        return None  # a step this module does not know might not treat a greyscale image like its RGB copy
    # The conversions to RGB are left to PixelTransform's end, which makes every image RGB, greyscale the cheap way.
    steps = [s for s in steps[:-2] if not (_name(s) == "_convert_to_rgb" or getattr(s, "mode", None) == "RGB")]
    return PixelTransform(steps, preprocess.transforms[-1].mean, preprocess.transforms[-1].std)


def _name(step) -> str:
    return getattr(step, "__name__", type(step).__name__)


def normalize_batch(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 as ``ToTensor`` + ``Normalize`` compute it per image: ``x / 255``, minus the mean,
    divided by the std, in that order (the same IEEE operations, so the same bits). Float input is returned as is."""
    if images.dtype != torch.uint8:
        return images
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return images.float().div_(255).sub_(mean).div_(std)


def loader_workers(workers: int, n: int | None, batch_size: int, shards: int | None = None) -> int:
    """Loader processes worth starting: none for a single batch (starting them costs more than decoding it), no more
    than batches (map-style) or shards (each worker reads whole shards) to share."""
    if n is not None and n <= batch_size:
        return 0
    if n is not None:
        workers = min(workers, -(-n // batch_size))
    return min(workers, shards) if shards is not None else workers


@dataclass
class EncodedImages:
    features: torch.Tensor
    """(N, D) L2-normalised float32 image features, on CPU."""
    keys: list[str]
    metas: list
    """Per sample: class index, multi-hot list, or ``{"labels": [...], "captions": [...]}``."""


class FeatureCache:
    """Tensors and lists saved with ``torch.save`` under ``root``, one file per key."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(**parts) -> str:
        blob = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()

    def path(self, kind: str, key: str) -> Path:
        return self.root / f"{kind}-{key[:40]}.pt"

    def load(self, kind: str, key: str) -> dict | None:
        path = self.path(kind, key)
        if not path.is_file():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a truncated file from an interrupted run: recompute rather than fail
            return None

    def save(self, kind: str, key: str, value: dict) -> None:
        # A reader never sees half a file; two processes filling one cache entry each write their own temporary.
        with AtomicFile(self.path(kind, key), "wb", unique=True) as f:
            torch.save(value, f)


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer (name, dtype, shape, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def transform_fingerprint(transform) -> str:
    # repr of a torchvision Compose names every step and its sizes/mean/std; function addresses change per process.
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))


def tokenizer_fingerprint(tokenizer) -> str:
    """Class, context length and the ids of a probe sentence: changes whenever tokenisation would."""
    probe = tokenizer(["Probe: a chest x-ray, 3 cm nodule; CT/MRI."])
    ids = probe.tolist() if hasattr(probe, "tolist") else probe
    return json.dumps([type(tokenizer).__name__, getattr(tokenizer, "context_length", None), ids])


@dataclass
class Encoder:
    """A frozen CLIP model with its tokenizer and eval transform, and how to run it.

    ``model_id`` replaces the weight hash in cache keys when given (hashing a large model takes seconds).
    """

    model: torch.nn.Module
    tokenizer: object
    preprocess: object
    device: str | torch.device = "cpu"
    batch_size: int = 64
    workers: int = 0
    cache: FeatureCache | None = None
    progress: bool = False
    model_id: str | None = None
    bf16: bool = False
    """Encode under bf16 autocast when the device is CUDA (features are stored as float32 either way)."""
    split_over_ranks: bool = False
    """Under ``torchrun``: every rank encodes its share of each dataset and all get the gathered features. Every
    rank must then make the same ``images`` calls in the same order (they meet in collectives)."""
    _fingerprint: str | None = field(default=None, init=False, repr=False)

    @property
    def fingerprint(self) -> str:
        if self.model_id:
            return self.model_id
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def images(
        self, source, max_samples: int | None = None, desc: str = "images", kind: str = "images"
    ) -> EncodedImages:
        """Encode every image of ``source`` (first ``max_samples`` only if given), from the cache when possible.

        ``kind`` names the cache files (``overlay``: the text-overlay probe's altered images).
        """
        key = None
        split = self.split_over_ranks and world_size() > 1
        if self.cache is not None:
            key = FeatureCache.key(
                model=self.fingerprint,
                data=source.fingerprint(),
                preprocess=transform_fingerprint(self.preprocess),
                max_samples=max_samples,
                **({"autocast": "bf16"} if self._autocast_on else {}),  # bf16 features differ from fp32 ones
            )
            # Rank 0's cache decides for all ranks (a cache on another node's disk must not send one rank alone
            # into the gather).
            hit = self.cache.load(kind, key) if not split or rank() == 0 else None
            hit = from_rank0(hit) if split else hit
            if hit is not None:
                return EncodedImages(hit["features"], hit["keys"], hit["metas"])
        encoded = self._encode_images(source, max_samples, desc)
        if key is not None and (not split or rank() == 0):
            self.cache.save(kind, key, {"features": encoded.features, "keys": encoded.keys, "metas": encoded.metas})
        return encoded

    @property
    def _autocast_on(self) -> bool:
        return self.bf16 and torch.device(self.device).type == "cuda"

    def _autocast(self):
        return torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self._autocast_on)

    @property
    def _loader_transform(self):
        """What the loader workers run: :class:`PixelTransform` where ``preprocess`` allows it, else ``preprocess``."""
        if getattr(self, "_pixels_for", None) is not self.preprocess:
            self._pixels_for, self._pixels = self.preprocess, pixel_transform(self.preprocess)
        return self._pixels or self.preprocess

    def _encode_images(self, source, max_samples: int | None, desc: str) -> EncodedImages:
        if getattr(source, "urls", None) is not None:
            return self._encode_shards(source, max_samples, desc)
        return self._encode_indexed(source, max_samples, desc)

    def _encode_indexed(self, source, max_samples: int | None, desc: str) -> EncodedImages:
        """A map-style dataset: rank r of N encodes samples r, r + N, ...; gathered back into index order."""
        r, n_ranks = (rank(), world_size()) if self.split_over_ranks else (0, 1)
        dataset = source.torch_dataset(self._loader_transform)
        n = len(dataset) if max_samples is None else min(len(dataset), max_samples)
        subset = Subset(dataset, range(r, n, n_ranks))
        features, keys, metas, _ = self._run(
            subset, desc, n // n_ranks, workers=loader_workers(self.workers, len(subset), self.batch_size)
        )
        if n_ranks == 1:
            return EncodedImages(features, keys, metas)
        parts = gather((features, keys, metas))
        out = EncodedImages(torch.empty(n, max(p[0].shape[1] for p in parts)), [None] * n, [None] * n)
        for i, (part_features, part_keys, part_metas) in enumerate(parts):
            if part_keys:  # a rank may have no sample (fewer samples than ranks): its (0, 0) features do not fit
                out.features[i::n_ranks] = part_features
            out.keys[i::n_ranks], out.metas[i::n_ranks] = part_keys, part_metas
        return out

    def _encode_shards(self, source, max_samples: int | None, desc: str) -> EncodedImages:
        """Shards: rank r of N reads shards r, r + N, ...; samples come back in (shard, position in shard) order.

        That order is the one a single reader sees, whatever the ranks and loader workers (each worker reads whole
        shards, interleaved batch by batch), so the figures do not depend on either.
        """
        r, n_ranks = (rank(), world_size()) if self.split_over_ranks else (0, 1)
        urls = source.urls[r::n_ranks]
        total = len(source) if hasattr(source, "__len__") else None
        workers = loader_workers(self.workers, None, self.batch_size, shards=len(urls))
        in_order = n_ranks == 1 and workers == 0  # arrival order is shard order: may stop at max_samples
        if urls:
            dataset = source.torch_dataset(self._loader_transform, urls=urls, positions=True)
            encoded = self._run(dataset, desc, total, max_samples if in_order else None, workers)
        else:  # more ranks than shards
            encoded = (torch.empty(0, 0), [], [], [])
        parts = gather(encoded) if n_ranks > 1 else [encoded]
        rows = sorted((pos, i, j) for i, part in enumerate(parts) for j, pos in enumerate(part[3]))[:max_samples]
        if not rows:
            return EncodedImages(torch.empty(0, max(p[0].shape[1] for p in parts)), [], [])
        features = torch.stack([parts[i][0][j] for _, i, j in rows])
        return EncodedImages(features, [parts[i][1][j] for _, i, j in rows], [parts[i][2][j] for _, i, j in rows])

    @torch.no_grad()
    def _run(self, dataset, desc: str, total: int | None, limit: int | None = None, workers: int | None = None):
        """(features, keys, metas, positions) of ``dataset`` in loader order, the first ``limit`` at most."""
        pixels = self._loader_transform if isinstance(self._loader_transform, PixelTransform) else None
        loader = DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.workers if workers is None else workers,
            collate_fn=collate,
            pin_memory=str(self.device).startswith("cuda"),
        )
        features, keys, metas, positions = [], [], [], []
        self.model.eval()
        with tqdm(total=total, desc=desc, unit="img", disable=not self.progress, leave=False) as bar, self._autocast():
            for images, batch_keys, batch_metas, *batch_positions in loader:
                room = len(batch_keys) if limit is None else limit - len(keys)
                images = images[:room].to(self.device, non_blocking=True)
                if pixels is not None:
                    images = normalize_batch(images, pixels.mean, pixels.std)
                out = self.model.encode_image(images, normalize=True)
                features.append(out.float().cpu())
                keys += batch_keys[:room]
                metas += batch_metas[:room]
                positions += batch_positions[0][:room] if batch_positions else []
                bar.update(len(batch_keys[:room]))
                if limit is not None and len(keys) >= limit:
                    break
        dim = features[0].shape[1] if features else 0
        return torch.cat(features) if features else torch.empty(0, dim), keys, metas, positions

    def texts(self, texts: list[str], desc: str = "texts") -> torch.Tensor:
        """(N, D) L2-normalised float32 text features, from the cache when possible."""
        key = None
        if self.cache is not None:
            text_hash = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
            key = FeatureCache.key(
                model=self.fingerprint,
                texts=text_hash,
                tokenizer=tokenizer_fingerprint(self.tokenizer),
                **({"autocast": "bf16"} if self._autocast_on else {}),
            )
            hit = self.cache.load("texts", key)
            if hit is not None:
                return hit["features"]
        features = self._encode_texts(texts, desc)
        if key is not None:
            self.cache.save("texts", key, {"features": features})
        return features

    @torch.no_grad()
    def _encode_texts(self, texts: list[str], desc: str) -> torch.Tensor:
        self.model.eval()
        out = []
        for start in tqdm(
            range(0, len(texts), self.batch_size), desc=desc, unit="batch", disable=not self.progress, leave=False
        ):
            tokens = self.tokenizer(texts[start : start + self.batch_size]).to(self.device)
            with self._autocast():
                out.append(self.model.encode_text(tokens, normalize=True).float().cpu())
        return torch.cat(out) if out else torch.empty(0, 0)
