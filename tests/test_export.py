"""open_clip interop: export to ``local-dir:`` and load without this project; import open_clip folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image

from medclip_train.config import ModelConfig
from medclip_train.export import export_checkpoint
from medclip_train.module import CLIPModule
from tests.training.conftest import bare_trainer

CAPTIONS = ["chest x-ray with a nodule", "axial ct of the abdomen", "mri of the brain"]

# Runs in a fresh interpreter whose sys.path has no trace of this repository: only open_clip loads the folder.
LOAD_WITH_OPEN_CLIP = """
import json, sys
import numpy as np, torch, open_clip
from PIL import Image
folder, images_path, captions = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model, preprocess = open_clip.create_model_from_pretrained("local-dir:" + folder)
tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
model.eval()
images = np.load(images_path)
batch = torch.stack([preprocess(Image.fromarray(a)) for a in images])
with torch.no_grad():
    out = {"image": model.encode_image(batch).tolist(), "text": model.encode_text(tokenizer(captions)).tolist(),
           "modules": sorted(m for m in sys.modules if m.startswith(("medclip_train", "data_prep")))}
print(json.dumps(out))
"""


def _trained_checkpoint(tmp_path: Path, tokenizer_dir: Path) -> Path:
    """A project checkpoint whose weights are not the initial ones (so that loading is really tested)."""
    L.seed_everything(1)
    module = CLIPModule(ModelConfig(preset="tiny", tokenizer=str(tokenizer_dir)))
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    trainer = L.Trainer(accelerator="cpu", max_steps=0, logger=False, enable_checkpointing=False)
    trainer.strategy.connect(module)
    trainer.strategy._lightning_module = module
    path = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_export_loads_in_open_clip_without_the_project(tmp_path, tiny_tokenizer_dir):
    ckpt = _trained_checkpoint(tmp_path, tiny_tokenizer_dir)
    folder = export_checkpoint(str(ckpt), str(tmp_path / "export"))
    names = sorted(p.name for p in folder.iterdir())
    assert "open_clip_config.json" in names and "open_clip_model.safetensors" in names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".ckpt", ".pkl"))], "exports carry no pickles"

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(3, 180, 200, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITH_OPEN_CLIP, str(folder), str(tmp_path / "images.npy"), json.dumps(CAPTIONS)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = json.loads(result.stdout.strip().splitlines()[-1])
    assert theirs["modules"] == [], "the fresh process must not import this project"

    from medclip_train.model.loading import load_project_checkpoint

    ours = load_project_checkpoint(ckpt)
    batch = torch.stack([ours.preprocess(Image.fromarray(a)) for a in images])
    with torch.no_grad():
        image = ours.model.encode_image(batch)
        text = ours.model.encode_text(ours.tokenizer(CAPTIONS))
    assert torch.max(torch.abs(image - torch.tensor(theirs["image"]))) < 1e-5
    assert torch.max(torch.abs(text - torch.tensor(theirs["text"]))) < 1e-5


def test_open_clip_folder_is_imported_and_training_starts_from_it(tmp_path, tiny_tokenizer_dir):
    import open_clip
    from open_clip.model import CustomTextCLIP
    from safetensors.torch import save_file

    from medclip_train.model.factory import resolve_open_clip_cfg
    from medclip_train.model.presets import resolve_hf_name

    # An open_clip folder made with open_clip itself: its own model class, weights and config layout.
    model_cfg, preprocess_cfg = resolve_open_clip_cfg(ModelConfig(preset="tiny", tokenizer=str(tiny_tokenizer_dir)))
    model_cfg["text_cfg"]["hf_model_name"] = resolve_hf_name(model_cfg["text_cfg"]["hf_model_name"])
    torch.manual_seed(5)
    source = CustomTextCLIP(**model_cfg)
    folder = tmp_path / "openclip_dir"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in preprocess_cfg.items()},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    open_clip.create_model_from_pretrained(f"local-dir:{folder}")  # open_clip accepts the folder

    L.seed_everything(0)  # another seed than the source: equal weights can only come from the import
    module = CLIPModule(ModelConfig(preset="tiny", tokenizer=str(tiny_tokenizer_dir), init_from=f"local-dir:{folder}"))
    own = module.model.state_dict()
    for name, value in source.state_dict().items():
        assert torch.equal(own[name], value), f"{name} not loaded"

    # Training starts from those weights: one optimiser step moves them only a little.
    from medclip_train.data.datamodule import WebDataModule
    from tests.shardkit import make_shards, shard_pattern

    shards = make_shards(tmp_path / "shards", [8], image_size=64)
    dm = WebDataModule(train=shard_pattern(shards), batch_size=8, num_workers=0)
    trainer = bare_trainer()
    trainer.fit(module, datamodule=dm)
    moved = max(
        (module.model.state_dict()[k].float() - v.float()).abs().max().item() for k, v in source.state_dict().items()
    )
    assert 0 < moved < 0.05
