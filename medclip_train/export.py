"""``medclip-export``: a project checkpoint -> an open_clip ``local-dir:`` folder (and optionally the HF Hub).

The folder holds ``open_clip_config.json`` (model and preprocess config), ``open_clip_model.safetensors``
(no pickle), the tokenizer files, the text tower's HF ``config.json`` and ``medclip_export.json`` (what this
tool wrote), so that ``open_clip.create_model_from_pretrained('local-dir:DIR')`` and
``open_clip.get_tokenizer('local-dir:DIR')`` load it without this project installed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from medclip_train.model.export_marker import EXPORT_FORMAT, EXPORT_MARKER, read_export_marker
from medclip_train.presets import BUILTIN_PREFIX, resolve_hf_name


def _is_hub_id(name: str) -> bool:
    return bool(name) and not name.startswith(BUILTIN_PREFIX) and not Path(name).exists() and name.count("/") == 1


def check_output_folder(out: Path, overwrite: bool = False) -> dict | None:
    """Refuse to write into a folder that holds something else than an earlier export; returns its marker."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output {out}: exists and is not a folder")
    marker = read_export_marker(out) if out.is_dir() else None
    if out.is_dir() and marker is None and not overwrite and any(out.iterdir()):
        # A user's config.json was once replaced here without a word: only our own earlier export is fair game.
        raise FileExistsError(
            f"--output {out}: folder is not empty and holds no earlier export ({EXPORT_MARKER}); "
            "choose an empty folder, or pass --overwrite to replace same-named files in it"
        )
    return marker


def export_checkpoint(
    checkpoint: str,
    output: str,
    overwrite: bool = False,
    hub_id: str | None = None,
    trust_remote_code: bool = False,
    ema: bool = False,
) -> Path:
    """Write the open_clip folder for ``checkpoint``; returns the folder.

    Args:
        overwrite: write into a non-empty folder that is not an earlier export (same-named files are replaced).
        ema: export the moving average of the weights (a run with ``model.ema_decay``) instead of the weights.
        hub_id: the HF Hub repo the folder will live in; a text tower config that is not on the Hub is then named
            by this id (the repo holds it), so the pushed model loads anywhere, not only from this folder.
        trust_remote_code: the user's explicit opt-in; the checkpoint's own ``trust_remote_code`` is never used.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig

    from medclip_train.model.loading import load_project_checkpoint

    out = Path(output).resolve()
    earlier = check_output_folder(out, overwrite)  # before the slow load: a refusal should be instant
    loaded = load_project_checkpoint(checkpoint, trust_remote_code=trust_remote_code, ema=ema)
    model_cfg = copy.deepcopy(loaded.model_cfg)
    text_cfg = model_cfg["text_cfg"]
    out.mkdir(parents=True, exist_ok=True)
    # Files are written into a staging folder next to ``out`` and moved in, so that the marker lists exactly the
    # files of this export and a failed export leaves an earlier one whole.
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        # The text tower's architecture must be readable by AutoConfig at load time. A hub id stays as it is (as
        # BiomedCLIP's own config does); a built-in or local config is copied here and named by the hub repo the
        # folder goes to, else by this folder's absolute path (open_clip 3.3 reads ``hf_model_name`` relative to
        # the working directory, not to the folder; our loader falls back to the copy here when the folder moved).
        hf_name = resolve_hf_name(text_cfg["hf_model_name"])
        AutoConfig.from_pretrained(hf_name, trust_remote_code=trust_remote_code).save_pretrained(staging)
        if not _is_hub_id(text_cfg["hf_model_name"]):
            text_cfg["hf_model_name"] = hub_id or str(out)
        loaded.tokenizer.tokenizer.save_pretrained(staging)
        if not _is_hub_id(text_cfg.get("hf_tokenizer_name") or ""):
            text_cfg["hf_tokenizer_name"] = hub_id or str(out)
        text_cfg.pop("hf_model_pretrained", None)
        model_cfg["vision_cfg"].pop("timm_model_pretrained", None)

        preprocess = {k: (list(v) if isinstance(v, tuple) else v) for k, v in loaded.preprocess_cfg.items()}
        config_path = staging / "open_clip_config.json"
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, f, indent=2)
        state = {k: v.detach().contiguous().clone() for k, v in loaded.model.state_dict().items()}
        weights_path = staging / "open_clip_model.safetensors"
        save_file(state, str(weights_path))
        # safetensors creates its file 0600 whatever the umask; give it the mode open() gave the other files.
        os.chmod(weights_path, stat.S_IMODE(config_path.stat().st_mode))

        files = sorted(p.name for p in staging.iterdir())
        if any((staging / name).is_dir() for name in files):
            raise ValueError(f"--output {out}: unexpected sub-folder in the export: {files}")
        for name in files:
            os.replace(staging / name, out / name)
        for name in _earlier_files(earlier) - set(files):
            (out / name).unlink(missing_ok=True)
        marker = {
            "format": EXPORT_FORMAT,
            "version": 1,
            "checkpoint": Path(checkpoint).name,  # not its absolute path: the folder may be pushed to the Hub
            "weights": "ema" if ema else "model",
            "hub_id": hub_id,
            "text_model_name": text_cfg["hf_model_name"],
            "files": files,
        }
        with open(out / EXPORT_MARKER, "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=2)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _earlier_files(marker: dict | None) -> set[str]:
    """File names an earlier export wrote; only plain names, so a doctored marker cannot reach outside the folder."""
    names = (marker or {}).get("files") or []
    return {n for n in names if isinstance(n, str) and n not in ("", ".", "..", EXPORT_MARKER) and Path(n).name == n}


def push_to_hub(folder: Path, repo_id: str, private: bool = True) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id)


def build_parser() -> argparse.ArgumentParser:
    """The ``medclip-export`` argument parser (also read by the test of README's commands)."""
    parser = argparse.ArgumentParser(prog="medclip-export", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a project checkpoint, e.g. checkpoints/demo/last.ckpt")
    parser.add_argument("--output", required=True, help="folder to write (open_clip local-dir format)")
    parser.add_argument(
        "--overwrite", action="store_true", help="write into a non-empty folder that is not an earlier export"
    )
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the folder to this HF Hub repo")
    parser.add_argument(
        "--hub-id",
        metavar="REPO_ID",
        help="the HF Hub repo the folder will be uploaded to (implied by --push-to-hub): the config names the text "
        "tower and tokenizer by it, so the uploaded model loads anywhere",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let Hugging Face run Python code shipped with the text tower (off; a checkpoint cannot turn it on)",
    )
    parser.add_argument(
        "--ema", action="store_true", help="export the moving average of the weights (a run with model.ema_decay)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.push_to_hub and args.hub_id and args.push_to_hub != args.hub_id:
        print(f"medclip-export: --hub-id {args.hub_id} differs from --push-to-hub {args.push_to_hub}", file=sys.stderr)
        return 2
    if not Path(args.checkpoint).is_file():
        print(f"medclip-export: --checkpoint {args.checkpoint} does not exist", file=sys.stderr)
        return 2
    hub_id = args.push_to_hub or args.hub_id
    try:
        out = export_checkpoint(
            args.checkpoint, args.output, args.overwrite, hub_id, args.trust_remote_code, ema=args.ema
        )
    except (ValueError, OSError) as err:  # FileExistsError (refused folder) and FileNotFoundError are OSErrors
        print(f"medclip-export: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out} (load with open_clip: 'local-dir:{out}')")
    if not hub_id:
        print(
            "note: open_clip finds the text tower config by this absolute path; after moving the folder, load it with "
            "medclip-eval, or set text_cfg.hf_model_name in open_clip_config.json to the new path"
        )
    if args.push_to_hub:
        push_to_hub(out, args.push_to_hub)
        print(f"pushed to https://huggingface.co/{args.push_to_hub}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
