"""Checks of a resume (``--ckpt_path``) against the checkpoint, before the model is built.

A resumed run must train on what the interrupted one would have: the same model and tokenizer, the same data in
the same epoch plan, from the same stream position. A setting that changed silently would give a model that no
config describes (another tokenizer's ids on the same embeddings, another shard list under the same epoch
counter), so a change is refused with the field named, unless the user lists it in ``--resume_allow_changed``.
The batch size, ranks, workers and shuffle buffer may change, also in the middle of an epoch: the data module
continues the epoch over the new layout (elastic resume, medclip_train/data/datamodule.py).
"""

from __future__ import annotations

import glob
import os
import re

import torch

# Fields of the model config that define what the weights mean (hyper_parameters["clip"] of the checkpoint).
MODEL_FIELDS = ("preset", "tokenizer", "text_model", "context_length", "embed_dim", "image_pool")
# Fields of the data config that define the epoch plan, as stored in the data module's state (its "layout").
DATA_FIELDS = ("train", "epoch_mode", "seed", "samples_per_epoch")


class ResumeMismatch(ValueError):
    """The resumed run's config differs from the checkpoint's in a field that changes what is trained on."""


def resolve_checkpoint(ckpt_path: str | None, dirpath: str) -> str | None:
    """The file ``--ckpt_path`` points at: ``last`` is the newest ``last*.ckpt`` in the run folder (Lightning's
    rule); ``best``/``hpc``/registry names and remote paths are left to Lightning (None)."""
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        pattern = re.compile(r"^last(-v\d+)?\.ckpt$")
        found = [p for p in glob.glob(os.path.join(dirpath, "last*.ckpt")) if pattern.match(os.path.basename(p))]
        return max(found, key=os.path.getmtime) if found else None
    if "://" in ckpt_path or ckpt_path in ("best", "hpc", "registry"):
        return None
    return ckpt_path if os.path.isfile(ckpt_path) else None


def read_resume_state(path: str) -> dict:
    """The small parts of a checkpoint a resume is checked against. ``mmap`` reads the pickled metadata without
    loading the tensors (a BiomedCLIP checkpoint with AdamW state is over a gigabyte)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {
        "global_step": int(ckpt.get("global_step", 0)),
        "clip": dict((ckpt.get("hyper_parameters") or {}).get("clip") or {}),
        "data": dict(ckpt.get("WebDataModule") or {}),
        "architecture": dict(ckpt.get("architecture") or {}),
    }


def _plain(value):
    """Config values as plain Python (jsonargparse Namespaces, dataclasses, tuples) for comparison."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        value = asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if k not in ("class_path", "__path__")} or None
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _train_sources(value) -> list[dict] | None:
    """``data.train`` normalised to a list of {shards, weight} (a plain string is one source of weight 1)."""
    value = _plain(value)
    if value is None:
        return None
    if isinstance(value, str):
        value = [{"shards": value}]
    out = []
    for source in value:
        source = source.get("init_args", source) if isinstance(source, dict) else {"shards": source}
        out.append({"shards": source.get("shards"), "weight": float(source.get("weight", 1.0))})
    return out


def check_resume(state: dict, model_clip, data, allowed: list[str]) -> list[str]:
    """Raise ``ResumeMismatch`` naming the first field that differs; return the allowed differences."""
    allowed = set(allowed or [])
    trained = (state.get("architecture") or {}).get("model_cfg")
    if trained is not None and state["clip"]:
        from medclip_train.model.factory import preset_drift

        drift = preset_drift(state["clip"], trained)
        if drift:
            raise ResumeMismatch(drift)
    changes: list[tuple[str, object, object]] = []
    clip_now = _plain(model_clip) or {}
    for field in MODEL_FIELDS:
        if field in state["clip"] and field in clip_now and state["clip"][field] != clip_now[field]:
            changes.append((f"model.clip.{field}", state["clip"][field], clip_now[field]))
    layout = state["data"].get("layout")
    data_now = _plain(data) or {}
    if layout is not None:
        for field in DATA_FIELDS:
            if field not in layout:
                continue
            now = _train_sources(data_now.get("train")) if field == "train" else data_now.get(field)
            if layout[field] != now:
                changes.append((f"data.{field}", layout[field], now))
    kept = []
    for name, before, now in changes:
        if name not in allowed:
            raise ResumeMismatch(
                f"{name}: the checkpoint was trained with {before!r}, this run has {now!r}; resume with the same "
                f"value, or pass --resume_allow_changed '[{name}]' if the change is intended"
            )
        kept.append(f"{name}: {before!r} -> {now!r}")
    return kept
