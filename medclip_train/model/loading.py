"""Load CLIP models for evaluation and fine-tuning: project checkpoints, open_clip dirs, hub names.

Anything from outside is read with ``torch.load(weights_only=True)`` or safetensors: no pickle code runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from medclip_train.model.export_marker import read_export_marker
from medclip_train.model.weights import (
    EMA_PREFIX,
    MODEL_PREFIX,
    load_state_dict_report,
    open_clip_model_cfg,
    read_project_checkpoint,
    submodule_state,
)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    preprocess: object
    """The eval transform (PIL image -> tensor)."""
    name: str
    model_cfg: dict | None = None
    preprocess_cfg: dict | None = None


def load_project_checkpoint(
    path: str | Path, device: str = "cpu", trust_remote_code: bool = False, ema: bool = False
) -> LoadedModel:
    """A Lightning checkpoint of this project: rebuild the model from its saved config, load the weights (with
    ``ema``: their moving average, kept by a run with ``model.ema_decay``).

    ``trust_remote_code`` is the caller's (the user's flag): the checkpoint's own ``trust_remote_code`` is ignored,
    since a file without any pickle could otherwise still run the Python code of a text tower it names.
    """
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from medclip_train.config import ModelConfig
    from medclip_train.model.factory import build_model

    ckpt = read_project_checkpoint(path)
    hparams = ckpt.get("hyper_parameters", {})
    if "clip" not in hparams:
        raise ValueError(f"{path}: no 'clip' model config in hyper_parameters; not a medclip-train checkpoint")
    trained = (ckpt.get("architecture") or {}).get("model_cfg")
    if trained is not None:
        from medclip_train.model.factory import preset_drift

        drift = preset_drift(hparams["clip"], trained)
        if drift:
            raise ValueError(f"{path}: {drift}")
    overrides = {"init_from": None, "pretrained_image": False, "pretrained_text": False}
    cfg = ModelConfig(**{**hparams["clip"], **overrides, "trust_remote_code": trust_remote_code})
    built = build_model(cfg)
    state = submodule_state(ckpt["state_dict"], EMA_PREFIX if ema else MODEL_PREFIX)
    if ema and not state:
        raise ValueError(f"--ema: {path} holds no moving average of the weights (trained without model.ema_decay)")
    report = load_state_dict_report(built.model, state)
    if report["missing"]:
        raise ValueError(f"{path}: checkpoint lacks weights {report['missing'][:5]}")
    built.model.to(device).eval()
    preprocess = image_transform_v2(PreprocessCfg(**built.preprocess_cfg), is_train=False)
    return LoadedModel(built.model, built.tokenizer, preprocess, str(path), built.model_cfg, built.preprocess_cfg)


def load_open_clip(
    source: str, pretrained: str | None = None, device: str = "cpu", trust_remote_code: bool = False
) -> LoadedModel:
    """``local-dir:DIR``, ``hf-hub:org/repo`` or a built-in open_clip name (+ pretrained tag or file).

    The text tower config is checked first with the caller's ``trust_remote_code`` (open_clip passes none, and
    transformers then prompts on a terminal), and the tokenizer gets the caller's value, which overrides any
    ``tokenizer_kwargs`` of the folder's ``open_clip_config.json``: nothing in the folder can turn remote code on.
    A ``local-dir:`` folder that was moved still loads: see :func:`resolve_local_text_model`.
    """
    import open_clip

    model_cfg = open_clip_model_cfg(source) or {}
    text_cfg = model_cfg.get("text_cfg") or {}
    overrides = {}
    if text_cfg.get("hf_model_name"):
        from medclip_train.model.factory import load_text_config

        name = text_cfg["hf_model_name"]
        if source.startswith("local-dir:"):
            name = resolve_local_text_model(Path(source[len("local-dir:") :]), name)
        load_text_config(name, trust_remote_code, "text_cfg.hf_model_name")  # of open_clip_config.json
        if name != text_cfg["hf_model_name"]:
            # open_clip applies keyword arguments over the folder's model config; the weights come from the folder.
            overrides["text_cfg"] = {**text_cfg, "hf_model_name": name, "hf_model_pretrained": False}
    model, preprocess = open_clip.create_model_from_pretrained(
        source, pretrained=pretrained, device=device, return_transform=True, weights_only=True, **overrides
    )
    model.eval()
    uses_hf_tokenizer = bool(text_cfg.get("hf_tokenizer_name")) or (source.startswith("hf-hub:") and not model_cfg)
    if not uses_hf_tokenizer:  # open_clip's own tokenizers take no transformers arguments
        return LoadedModel(model, open_clip.get_tokenizer(source), preprocess, source)
    try:
        tokenizer = open_clip.get_tokenizer(source, trust_remote_code=trust_remote_code)
    except ValueError as err:
        from medclip_train.model.factory import RemoteCodeRefused, remote_code_reference

        folder = source[len("local-dir:") :] if source.startswith("local-dir:") else text_cfg["hf_tokenizer_name"]
        reference = remote_code_reference(folder, "tokenizer_config.json", "AutoTokenizer")
        if reference is not None and not trust_remote_code:
            raise RemoteCodeRefused(source, "tokenizer_config.json", reference) from err
        raise
    return LoadedModel(model, tokenizer, preprocess, source)


def resolve_local_text_model(folder: Path, name: str) -> str:
    """Where the text tower config named by ``text_cfg.hf_model_name`` of the open_clip folder ``folder`` is.

    open_clip 3.3 passes the name to transformers as it is, so a path is read relative to the working directory
    and an export (which names its own folder by absolute path) breaks when moved. Here:

    - an export of this project (marker file) whose name is unchanged uses its own copy, ``folder/config.json``;
    - a relative path is read relative to the folder;
    - an absolute path that no longer holds a ``config.json`` falls back to ``folder/config.json``;
    - anything else (a hub id) is returned unchanged.
    """
    marker = read_export_marker(folder)
    own = folder / "config.json"
    if marker and marker.get("text_model_name") == name and own.is_file():
        return str(folder.resolve())
    path = Path(name)
    if not path.is_absolute() and (folder / path / "config.json").is_file():
        return str((folder / path).resolve())
    if path.is_absolute() or name.startswith((".", "~")):
        if (path.expanduser() / "config.json").is_file():
            return name
        if own.is_file():
            return str(folder.resolve())
        raise FileNotFoundError(
            f"local-dir:{folder}: text_cfg.hf_model_name {name!r} in open_clip_config.json holds no config.json and "
            "the folder has none either; set it to a folder with the text tower's config.json or to its HF Hub id"
        )
    return name


def load_model(
    source: str, device: str = "cpu", pretrained: str | None = None, trust_remote_code: bool = False
) -> LoadedModel:
    """Any model source of ``medclip-eval``: ``*.ckpt`` of this project, ``local-dir:``, ``hf-hub:``, open_clip name.

    ``trust_remote_code`` must come from the user (a command-line flag), never from the model source.
    """
    if source.endswith(".ckpt"):
        if not Path(source).is_file():
            raise FileNotFoundError(f"--model: checkpoint {source} does not exist")
        return load_project_checkpoint(source, device, trust_remote_code)
    if source.startswith("local-dir:") and not Path(source[len("local-dir:") :]).is_dir():
        raise FileNotFoundError(f"--model: folder {source[len('local-dir:') :]} does not exist")
    return load_open_clip(source, pretrained, device, trust_remote_code)
