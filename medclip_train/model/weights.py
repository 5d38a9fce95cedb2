"""CLIP weights into a built model: a project checkpoint's, an open_clip folder's or a hub repo's, with a key report.

Below :mod:`medclip_train.model.factory` (which loads ``model.clip.init_from`` through it) and
:mod:`medclip_train.model.loading` (which rebuilds a model first): it builds no model itself. Anything from outside is
read with ``torch.load(weights_only=True)`` or safetensors: no pickle code runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

IGNORED_KEYS = ("position_ids",)
"""Buffers that older BERT checkpoints carry and newer transformers do not (or the reverse): not a mismatch."""


def read_project_checkpoint(path: str | Path) -> dict:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from err


def load_state_dict_report(model: torch.nn.Module, state: dict) -> dict:
    """``load_state_dict(strict=False)`` with a report of loaded, missing and unexpected keys."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith(IGNORED_KEYS) or k in own}
    shape_mismatch = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if shape_mismatch:
        raise ValueError(f"shape mismatch for {shape_mismatch[:5]}: the checkpoint is for another architecture")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(IGNORED_KEYS)]
    unexpected = [k for k in result.unexpected_keys if not k.endswith(IGNORED_KEYS)]
    report = {"loaded": len(state) - len(result.unexpected_keys), "missing": missing, "unexpected": unexpected}
    log.info("loaded %d tensors; missing %s; unexpected %s", report["loaded"], missing, unexpected)
    return report


def load_clip_weights(model: torch.nn.Module, source: str) -> dict:
    """Initialise ``model`` from full CLIP weights (``model.clip.init_from``); returns the key report.

    ``local-dir:DIR`` reads ``DIR/open_clip_model.safetensors`` (or ``open_clip_pytorch_model.bin``),
    ``hf-hub:org/repo`` the same files from the Hub (cache), ``*.ckpt`` a project checkpoint.
    """
    if source.endswith(".ckpt"):
        ckpt = read_project_checkpoint(source)
        state = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    else:
        state = _read_open_clip_weights(source)
    report = load_state_dict_report(model, state)
    if report["loaded"] == 0:
        raise ValueError(f"model.clip.init_from={source!r}: no weight matched this model's architecture")
    print(
        f"init_from {source}: loaded {report['loaded']} tensors, missing {len(report['missing'])}"
        f"{' ' + str(report['missing'][:5]) if report['missing'] else ''}, unexpected {len(report['unexpected'])}"
        f"{' ' + str(report['unexpected'][:5]) if report['unexpected'] else ''}"
    )
    return report


def _read_open_clip_weights(source: str) -> dict:
    from open_clip.factory import _find_checkpoint_in_dir

    if source.startswith("local-dir:"):
        folder = Path(source[len("local-dir:") :])
        path = _find_checkpoint_in_dir(folder) if folder.is_dir() else None
        if path is None:
            raise FileNotFoundError(f"model.clip.init_from={source!r}: no open_clip weights file in {folder}")
    elif source.startswith("hf-hub:"):
        from open_clip.pretrained import download_pretrained_from_hf

        try:
            path = download_pretrained_from_hf(source[len("hf-hub:") :])
        except Exception as err:
            raise FileNotFoundError(
                f"model.clip.init_from={source!r}: weights not found in the HF cache and not downloadable "
                f"({type(err).__name__}). Download the repo once, or use local-dir:PATH"
            ) from err
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"model.clip.init_from={source!r}: no such file")
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state
