"""``medclip-export``: a project checkpoint -> an open_clip ``local-dir:`` folder (and optionally the HF Hub).

The folder holds ``open_clip_config.json`` (model and preprocess config), ``open_clip_model.safetensors``
(no pickle), the tokenizer files, and the text tower's HF ``config.json``, so that
``open_clip.create_model_from_pretrained('local-dir:DIR')`` and ``open_clip.get_tokenizer('local-dir:DIR')``
load it without this project installed.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from medclip_train.model.presets import BUILTIN_PREFIX, resolve_hf_name


def _is_hub_id(name: str) -> bool:
    return bool(name) and not name.startswith(BUILTIN_PREFIX) and not Path(name).exists() and name.count("/") == 1


def export_checkpoint(checkpoint: str, output: str) -> Path:
    """Write the open_clip folder for ``checkpoint``; returns the folder."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from medclip_train.model.loading import load_project_checkpoint

    loaded = load_project_checkpoint(checkpoint)
    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = copy.deepcopy(loaded.model_cfg)
    text_cfg = model_cfg["text_cfg"]

    # The text tower's architecture must be readable by AutoConfig at load time. A hub id stays as it is (as
    # BiomedCLIP's own config does); a built-in or local config is copied here and referenced by absolute path.
    AutoConfig.from_pretrained(resolve_hf_name(text_cfg["hf_model_name"])).save_pretrained(out)
    if not _is_hub_id(text_cfg["hf_model_name"]):
        text_cfg["hf_model_name"] = str(out)
    loaded.tokenizer.tokenizer.save_pretrained(out)
    if not _is_hub_id(text_cfg.get("hf_tokenizer_name") or ""):
        text_cfg["hf_tokenizer_name"] = str(out)
    text_cfg.pop("hf_model_pretrained", None)
    model_cfg["vision_cfg"].pop("timm_model_pretrained", None)

    preprocess = {k: (list(v) if isinstance(v, tuple) else v) for k, v in loaded.preprocess_cfg.items()}
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess}
    with open(out / "open_clip_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    state = {k: v.detach().contiguous().clone() for k, v in loaded.model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    return out


def push_to_hub(folder: Path, repo_id: str, private: bool = True) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medclip-export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a project checkpoint, e.g. checkpoints/demo/last.ckpt")
    parser.add_argument("--output", required=True, help="folder to write (open_clip local-dir format)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the folder to this HF Hub repo")
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        print(f"medclip-export: --checkpoint {args.checkpoint} does not exist", file=sys.stderr)
        return 2
    try:
        out = export_checkpoint(args.checkpoint, args.output)
    except (ValueError, FileNotFoundError) as err:
        print(f"medclip-export: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out} (load with open_clip: 'local-dir:{out}')")
    if args.push_to_hub:
        push_to_hub(out, args.push_to_hub)
        print(f"pushed to https://huggingface.co/{args.push_to_hub}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
