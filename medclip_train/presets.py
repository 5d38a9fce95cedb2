"""Model presets, each an open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``).

A preset is exactly what open_clip reads from ``open_clip_config.json``, so a model of this project is an
open_clip ``CustomTextCLIP`` (timm image tower + Hugging Face text tower) and exports without conversion.
``builtin:<name>`` in ``hf_model_name`` points to a small BERT config shipped in ``model/hf_configs/`` (used by
the tiny presets, which must build without any download).
"""

from __future__ import annotations

import copy
from pathlib import Path

HF_CONFIG_DIR = Path(__file__).parent / "model" / "hf_configs"
BUILTIN_PREFIX = "builtin:"

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PUBMEDBERT = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"

_OPENAI_PREPROCESS = {
    "mean": OPENAI_MEAN,
    "std": OPENAI_STD,
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


def _vit_pubmedbert(timm_name: str) -> dict:
    """A timm ViT with BiomedCLIP's text side: PubMedBERT, CLS of the last hidden state, MLP projection, ctx 256."""
    return {
        "model_cfg": {
            "embed_dim": 512,
            "vision_cfg": {
                "timm_model_name": timm_name,
                "timm_model_pretrained": False,
                "timm_pool": "",
                "timm_proj": "linear",
                "image_size": 224,
            },
            "text_cfg": {
                "hf_model_name": PUBMEDBERT,
                "hf_tokenizer_name": PUBMEDBERT,
                "hf_proj_type": "mlp",
                "hf_pooler_type": "cls_last_hidden_state_pooler",
                "context_length": 256,
            },
        },
        "preprocess_cfg": _OPENAI_PREPROCESS,
    }


PRESETS: dict[str, dict] = {
    # BiomedCLIP (Zhang et al. 2023): the architecture of microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224.
    "biomedclip_vit_b16_pubmedbert256": _vit_pubmedbert("vit_base_patch16_224"),
    # Mid-size: ViT-S/16 with the same PubMedBERT text tower (about a third of ViT-B's image FLOPs).
    "vit_s16_pubmedbert256": _vit_pubmedbert("vit_small_patch16_224"),
    # The CPU benchmark config of bench/: vit_tiny at 224 px, 4-layer 256-wide BERT, context 128, embed 256.
    "bench_cpu_vit_tiny_bert_mini": {
        "model_cfg": {
            "embed_dim": 256,
            "vision_cfg": {
                "timm_model_name": "vit_tiny_patch16_224",
                "timm_model_pretrained": False,
                "timm_pool": "",
                "timm_proj": "linear",
                "image_size": 224,
            },
            "text_cfg": {
                "hf_model_name": BUILTIN_PREFIX + "bert-mini",
                "hf_tokenizer_name": None,
                "hf_proj_type": "mlp",
                "hf_pooler_type": "cls_last_hidden_state_pooler",
                "context_length": 128,
            },
        },
        "preprocess_cfg": _OPENAI_PREPROCESS,
    },
    # Tiny: timm's own 160 px test ViT (6 blocks, width 64) and a 2-layer, 128-wide BERT. Demo and tests.
    "tiny": {
        "model_cfg": {
            "embed_dim": 128,
            "vision_cfg": {
                "timm_model_name": "test_vit",
                "timm_model_pretrained": False,
                "timm_pool": "",
                "timm_proj": "linear",
                "image_size": 160,
            },
            "text_cfg": {
                "hf_model_name": BUILTIN_PREFIX + "bert-tiny",
                "hf_tokenizer_name": None,
                "hf_proj_type": "mlp",
                "hf_pooler_type": "cls_last_hidden_state_pooler",
                "context_length": 64,
            },
        },
        "preprocess_cfg": _OPENAI_PREPROCESS,
    },
}


def get_preset(name: str) -> dict:
    """A deep copy of preset ``name`` (``model_cfg`` and ``preprocess_cfg``)."""
    if name not in PRESETS:
        raise ValueError(f"model.clip.preset: unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def resolve_hf_name(name: str) -> str:
    """``builtin:<n>`` -> path of the shipped config folder; any other name (hub id or local path) unchanged."""
    if name and name.startswith(BUILTIN_PREFIX):
        path = HF_CONFIG_DIR / name[len(BUILTIN_PREFIX) :]
        if not (path / "config.json").is_file():
            raise ValueError(f"text tower {name!r}: no built-in config at {path}")
        return str(path)
    return name
