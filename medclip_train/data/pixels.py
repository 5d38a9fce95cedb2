"""Images travel from the loader workers as uint8 pixels and are normalised after the transfer to the device.

open_clip's transform ends with ToTensor + Normalize, so its workers ship float32 batches: 4x the bytes through
shared memory (and pinned memory and PCIe on a GPU), and the float work runs in the worker, which on a small CPU
host competes with the training threads. Here the workers stop at the resized/cropped pixels and
``normalize_pixels`` does ``(x / 255 - mean) / std`` on the whole batch where the model runs.
"""

from __future__ import annotations

import torch
from torchvision import transforms


def pixels_transform(transform: transforms.Compose) -> transforms.Compose:
    """open_clip's ``image_transform_v2`` with its ToTensor + Normalize tail replaced by a uint8 CHW tensor."""
    steps = list(transform.transforms)
    names = [type(t).__name__ for t in steps[-2:]]
    if names != ["MaybeToTensor", "Normalize"] and names != ["ToTensor", "Normalize"]:
        raise ValueError(f"unexpected image transform tail {names}: expected ToTensor, Normalize")
    return transforms.Compose([*steps[:-2], transforms.PILToTensor()])


def normalize_pixels(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 normalised like ToTensor + Normalize; float input is returned unchanged."""
    if images.dtype != torch.uint8:
        return images
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    # Two fused passes instead of three: x * (1 / (255 std)) - mean / std.
    return torch.addcmul(-mean / std, images.float(), 1.0 / (255.0 * std))
