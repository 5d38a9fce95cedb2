from medclip_train.model.factory import BuiltModel, build_model, build_tokenizer, resolve_open_clip_cfg
from medclip_train.presets import PRESETS, get_preset

__all__ = ["PRESETS", "BuiltModel", "build_model", "build_tokenizer", "get_preset", "resolve_open_clip_cfg"]
