"""CLIP weights into a built model: a project checkpoint's, an open_clip folder's or a hub repo's, with a key report.

Below :mod:`medclip_train.model.factory` (which loads ``model.clip.init_from`` through it) and
:mod:`medclip_train.model.loading` (which rebuilds a model first): it builds no model itself. Anything from outside is
read with ``torch.load(weights_only=True)`` or safetensors: no pickle code runs.
"""

from __future__ import annotations

import json
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


MODEL_PREFIX = "model."
"""Where a project checkpoint's ``state_dict`` holds the CLIP model's weights (``CLIPModule.model``)."""
EMA_PREFIX = "ema.module."
"""Where it holds their moving average (``CLIPModule.ema``, a run with ``model.ema_decay``)."""


def submodule_state(state_dict: dict, prefix: str) -> dict:
    """The entries of ``state_dict`` under ``prefix``, with the prefix taken off."""
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_clip_weights(model: torch.nn.Module, source: str, image_pool: str | None = None) -> dict:
    """Initialise ``model`` from full CLIP weights (``model.clip.init_from``); returns the key report.

    ``local-dir:DIR`` reads ``DIR/open_clip_model.safetensors`` (or ``open_clip_pytorch_model.bin``),
    ``hf-hub:org/repo`` the same files from the Hub (cache), ``*.ckpt`` a project checkpoint. ``image_pool`` is
    the timm pooling of ``model``: a source trained with another one is refused (see :func:`check_image_pool`).
    """
    if source.endswith(".ckpt"):
        ckpt = read_project_checkpoint(source)
        clip = (ckpt.get("hyper_parameters") or {}).get("clip") or {}
        check_image_pool(source, _project_image_pool(clip), image_pool)
        state = submodule_state(ckpt["state_dict"], MODEL_PREFIX)
    else:
        if source.startswith("local-dir:"):
            check_image_pool(source, _export_image_pool(source), image_pool)
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


def check_image_pool(source: str, trained_with: str | None, building: str | None) -> None:
    """Refuse weights trained with another pooling of the image tokens: pooling has no weights, so every tensor
    would load and the model would silently compute other image features than the one that was trained."""
    if trained_with is None or building is None or trained_with == building:
        return
    raise ValueError(
        f"model.clip.init_from={source!r} was trained with image pooling {trained_with!r}, this model pools by "
        f"{building!r}: set --model.clip.image_pool {trained_with}"
    )


def _project_image_pool(clip: dict) -> str | None:
    """The timm pooling a project checkpoint's model was built with (its ``image_pool``, else its preset's)."""
    from medclip_train.presets import PRESETS

    if clip.get("image_pool"):
        return clip["image_pool"]
    if clip.get("preset") not in PRESETS:
        return None
    return PRESETS[clip["preset"]]["model_cfg"]["vision_cfg"].get("timm_pool") or "token"  # "": timm's ViT default


def _export_image_pool(source: str) -> str | None:
    """The timm pooling in an open_clip folder's config, if it names a timm tower."""
    vision = (open_clip_model_cfg(source) or {}).get("vision_cfg") or {}
    return (vision.get("timm_pool") or "token") if "timm_model_name" in vision else None


def open_clip_model_cfg(source: str) -> dict | None:
    """The ``model_cfg`` open_clip will build ``source`` from, or ``None`` where open_clip reports the problem."""
    import open_clip

    if source.startswith("local-dir:"):
        path = Path(source[len("local-dir:") :]) / "open_clip_config.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except OSError:
            return None
        except ValueError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        return config.get("model_cfg") if isinstance(config, dict) else None
    if source.startswith("hf-hub:"):
        from open_clip.factory import _get_hf_config

        try:
            return _get_hf_config(source[len("hf-hub:") :]).get("model_cfg")
        except Exception:  # offline, unknown repo: open_clip's own call raises the error the user should see
            return None
    return open_clip.get_model_config(source.replace("/", "-"))


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
