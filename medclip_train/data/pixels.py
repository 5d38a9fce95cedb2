"""Images travel from the loader workers as uint8 pixels and are normalised after the transfer to the device.

open_clip's transform ends with ToTensor + Normalize, so its workers ship float32 batches: 4x the bytes through
shared memory (and pinned memory and PCIe on a GPU), and the float work runs in the worker, which on a small CPU
host competes with the training threads. Here the workers stop at the resized/cropped pixels and
``normalize_pixels`` does ``(x / 255 - mean) / std`` on the whole batch where the model runs.

The worker's own per-sample Python is kept small (``python -m bench data`` compares it with the raw JPEG decode
limit): the random crop draws its parameters with one RNG call per try instead of torchvision's eight tensor ops,
and the training stream's transform stops at the PIL image, which ``stack_pixels`` copies once, transposing it to
channel-first, straight into the shared-memory batch (``PILToTensor`` would copy it first, and ``torch.stack`` of
channel-first views does the transposing copy 3-5x slower on one thread).
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import torch
from open_clip.transform import MaybeConvertMode
from PIL import Image
from torchvision import transforms
from torchvision.transforms.functional import InterpolationMode, pil_modes_mapping


class RandomResizedCropPIL(torch.nn.Module):
    """torchvision's ``RandomResizedCrop`` for PIL images, with the same crop distribution and the same pixels.

    ``get_params`` there makes about eight small tensors per sample (``torch.tensor(ratio)``, ``log``, ``exp``,
    ``empty().uniform_`` twice, ``randint`` twice, ``item`` four times): about 0.1 ms of Python per sample, a few
    percent of a sample's decode. Here one ``torch.rand(4)`` per try draws the same four uniforms (torch's generator,
    seeded per loader worker as before); the crop and resize are ``F.resized_crop``'s PIL calls, so for the same
    parameters the output is identical.
    """

    def __init__(self, crop: transforms.RandomResizedCrop):
        super().__init__()
        self.size = tuple(crop.size)
        self.scale = tuple(crop.scale)
        self.ratio = tuple(crop.ratio)
        self.interpolation = crop.interpolation
        self.resample = pil_modes_mapping[crop.interpolation]

    def get_params(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the crop, as ``RandomResizedCrop.get_params`` draws them."""
        area = width * height
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            u = torch.rand(4, dtype=torch.float64).tolist()
            target_area = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[0])
            aspect_ratio = math.exp(lo + (hi - lo) * u[1])
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                return int(u[2] * (height - h + 1)), int(u[3] * (width - w + 1)), h, w
        # Fallback to a central crop, as torchvision does.
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def forward(self, img):
        top, left, h, w = self.get_params(*img.size)
        return img.crop((left, top, left + w, top + h)).resize(self.size[::-1], self.resample)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio}, {self.interpolation})"


def pixels_transform(transform: transforms.Compose, tensor: bool = True) -> transforms.Compose:
    """open_clip's ``image_transform_v2`` with its ToTensor + Normalize tail replaced by a uint8 CHW tensor, and its
    ``RandomResizedCrop`` (train) by :class:`RandomResizedCropPIL` (the same crops, less Python per sample) and its
    ``MaybeConvertMode`` by :class:`ConvertModePIL` (the same pixels, no copy).

    ``tensor=False``: no tail at all; the transform returns the resized/cropped PIL image, for ``stack_pixels`` to copy
    into the batch (the same pixels as stacking the tensors, one copy fewer).
    """
    steps = list(transform.transforms)
    names = [type(t).__name__ for t in steps[-2:]]
    if names != ["MaybeToTensor", "Normalize"] and names != ["ToTensor", "Normalize"]:
        raise ValueError(f"unexpected image transform tail {names}: expected ToTensor, Normalize")
    steps = [_fast(t) for t in steps[:-2]]
    return transforms.Compose([*steps, transforms.PILToTensor()] if tensor else steps)


class ConvertModePIL:
    """open_clip's ``MaybeConvertMode`` without the copy: PIL's ``convert`` to the mode an image already has returns
    a copy (about 0.01 ms for a 224 px RGB image); the pixels are the same."""

    def __init__(self, mode: str = "RGB"):
        self.mode = mode

    def __call__(self, pic):
        if not isinstance(pic, Image.Image) or pic.mode == self.mode:
            return pic  # arrays and tensors pass as in MaybeConvertMode
        return pic.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mode!r})"


def _fast(step):
    # type() is, not isinstance: a subclass may draw its crops differently. Modes PIL cannot resize with stay.
    if type(step) is transforms.RandomResizedCrop and step.interpolation != InterpolationMode.NEAREST_EXACT:
        return RandomResizedCropPIL(step)
    if type(step) is MaybeConvertMode:
        return ConvertModePIL(step.mode)
    return step


def stack_pixels(images: list, allocate=None) -> torch.Tensor:
    """``torch.stack`` of the worker's (C, H, W) pixel tensors, or of ``PILToTensor`` of its PIL images; faster, and
    into shared memory.

    A PIL image is read through ``np.asarray`` (a view of its bytes) and copied once, transposed to channel-first,
    into its slot of the batch. ``PILToTensor`` returns a channel-first view of the image's (H, W, C) pixels, so
    stacking tensors is a transposing copy too; numpy does it several times faster than ``torch.stack`` on one thread
    (0.03 vs 0.15-0.2 ms per 224 px sample). In a loader worker the batch is written into a new shared-memory block, as
    ``default_collate`` does, instead of being copied there when it is sent to the main process.

    ``allocate(shape, dtype)``: where the batch goes instead (:meth:`PixelSlots.take`).
    """
    allocate = allocate or _batch
    if isinstance(images[0], Image.Image):
        arrays = [_hwc(image) for image in images]
        height, width, channels = arrays[0].shape
        out = allocate((len(arrays), channels, height, width), torch.from_numpy(np.empty(0, arrays[0].dtype)).dtype)
        pixels = out.numpy()
        for i, array in enumerate(arrays):
            pixels[i] = array.transpose(2, 0, 1)
        return out
    first = images[0]
    out = allocate((len(images), *first.shape), first.dtype)  # numpy writes it: a CPU tensor, as the images are
    np.stack([im.numpy() for im in images], out=out.numpy())
    return out


def _hwc(image) -> np.ndarray:
    array = np.asarray(image)
    return array[:, :, None] if array.ndim == 2 else array  # one band (L, I;16...): PILToTensor gives it C = 1


def _batch(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in a loader worker, in a new shared-memory block (as default_collate allocates)."""
    from torch.utils.data import get_worker_info

    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(math.prod(shape), device=proto.device)
    return proto.new(storage).resize_(shape)


class PixelSlots:
    """Shared-memory pixel batches that a loader worker reuses once the main process has dropped them.

    A new shared-memory block per batch costs a worker about 3.5 ms per batch of 32 at 224 px (creating it, and the
    kernel zeroing and mapping its pages on first write): 0.11 ms per sample, 4% of its work. Here each worker keeps
    ``slots`` blocks. The main process (:meth:`released`) frees a slot when the last reference to its batch's pixels
    dies (a finalizer on the storage, so views and batches kept by a callback hold it too); a worker reuses a slot
    only while it is free, and allocates a new block when none is (never waits). Made in the main process before
    the workers start, per iteration of the loader; the flags are shared memory.
    """

    def __init__(self, workers: int, slots: int):
        self.busy = torch.zeros((workers, slots), dtype=torch.uint8).share_memory_()
        self._blocks: dict[int, torch.Tensor] = {}  # this worker's, filled in the worker

    def __getstate__(self) -> dict:
        return {"busy": self.busy, "_blocks": {}}

    def take(self, worker: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A batch tensor for ``worker``: a free slot's block (marked busy), else a new block outside the slots."""
        busy = self.busy[worker].numpy()
        for slot in range(len(busy)):
            block = self._blocks.get(slot)
            if busy[slot] or (block is not None and (block.shape != shape or block.dtype != dtype)):
                continue
            if block is None:
                block = self._blocks[slot] = _batch(shape, dtype)
            busy[slot] = 1
            return block
        return _batch(shape, dtype)

    def slot_of(self, block: torch.Tensor) -> int | None:
        """The slot ``block`` came from (worker side); None for a block made outside the slots."""
        return next((slot for slot, mine in self._blocks.items() if mine is block), None)

    def released(self, batches):
        """The loader's batches, each slot freed when its pixels are dropped (main process)."""
        for batch in batches:
            slot = batch.pop(SLOT_KEY, None)
            if slot is not None:
                weakref.finalize(batch["image"].untyped_storage(), self._free, *slot)
            yield batch

    def _free(self, worker: int, slot: int) -> None:
        self.busy[worker, slot] = 0


SLOT_KEY = "_pixel_slot"
"""The (worker, slot) of a batch's pixels, popped by :meth:`PixelSlots.released` before anyone sees the batch."""


def normalize_pixels(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 normalised like ToTensor + Normalize; float input is returned unchanged."""
    if images.dtype != torch.uint8:
        return images
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    # Two fused passes instead of three: x * (1 / (255 std)) - mean / std.
    return torch.addcmul(-mean / std, images.float(), 1.0 / (255.0 * std))
