"""open_clip interop: export to ``local-dir:`` and load without this project; import open_clip folders."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from medclip_train.config import ModelConfig
from medclip_train.export import EXPORT_MARKER, export_checkpoint
from medclip_train.export import main as export_main
from medclip_train.module import CLIPModule
from tests.training.conftest import bare_trainer

CAPTIONS = ["chest x-ray with a nodule", "axial ct of the abdomen", "mri of the brain"]

# Runs in a fresh interpreter whose sys.path has no trace of this repository: only open_clip loads the folder.
LOAD_WITH_OPEN_CLIP = """
import json, sys
import numpy as np, torch, open_clip
from PIL import Image
name, images_path, captions = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model, preprocess = open_clip.create_model_from_pretrained(name)
tokenizer = open_clip.get_tokenizer(name)
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

    images = _images()
    theirs = _open_clip_in_fresh_process(f"local-dir:{folder}", images, tmp_path)
    _assert_same_features(ckpt, images, theirs)


def _open_clip_in_fresh_process(name: str, images: np.ndarray, tmp_path: Path, **env_overrides) -> dict:
    """Image and text features of ``name`` computed by open_clip alone, in a process that cannot import the project."""
    np.save(tmp_path / "images.npy", images)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(env_overrides)
    result = subprocess.run(
        [sys.executable, "-c", LOAD_WITH_OPEN_CLIP, name, str(tmp_path / "images.npy"), json.dumps(CAPTIONS)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = json.loads(result.stdout.strip().splitlines()[-1])
    assert theirs["modules"] == [], "the fresh process must not import this project"
    return theirs


def _assert_same_features(ckpt: Path, images: np.ndarray, theirs) -> None:
    """``theirs`` (a dict of feature lists, or a loaded model) equals the checkpoint's model to 1e-5."""
    from medclip_train.model.loading import load_project_checkpoint

    ours = load_project_checkpoint(ckpt)
    expected = _features(ours, images)
    got = theirs if isinstance(theirs, dict) else _features(theirs, images)
    for key in ("image", "text"):
        assert torch.max(torch.abs(expected[key] - torch.as_tensor(got[key]))) < 1e-5, key


def _features(loaded, images: np.ndarray) -> dict:
    batch = torch.stack([loaded.preprocess(Image.fromarray(a)) for a in images])
    loaded.model.eval()
    with torch.no_grad():
        return {"image": loaded.model.encode_image(batch), "text": loaded.model.encode_text(loaded.tokenizer(CAPTIONS))}


def _images(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, size=(3, 180, 200, 3), dtype=np.uint8)


def test_open_clip_folder_is_imported_and_training_starts_from_it(tmp_path, tiny_tokenizer_dir):
    import open_clip
    from open_clip.model import CustomTextCLIP
    from safetensors.torch import save_file

    from medclip_train.model.factory import resolve_open_clip_cfg
    from medclip_train.presets import resolve_hf_name

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
    dm.connect(module.tokenizer, module.preprocess_cfg)
    trainer = bare_trainer()
    trainer.fit(module, datamodule=dm)
    moved = max(
        (module.model.state_dict()[k].float() - v.float()).abs().max().item() for k, v in source.state_dict().items()
    )
    assert 0 < moved < 0.05


# ------------------------------------------------------------------------------------ the export folder on disk


@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    return _trained_checkpoint(tmp_path_factory.mktemp("ckpt"), tiny_tokenizer_dir)


def test_export_files_share_one_mode_that_follows_the_umask(trained_ckpt, tmp_path):
    # safetensors' writer created the weights file 0600 whatever the umask; every other file followed it (0644).
    previous = os.umask(0o027)
    try:
        folder = export_checkpoint(str(trained_ckpt), str(tmp_path / "export"))
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.is_file()}
    assert "open_clip_model.safetensors" in modes
    assert set(modes.values()) == {0o666 & ~0o027}, {name: oct(mode) for name, mode in modes.items()}


def test_export_refuses_a_non_empty_folder_that_is_not_an_export(trained_ckpt, tmp_path, capsys):
    out = tmp_path / "my_model"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    assert export_main(["--checkpoint", str(trained_ckpt), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(out) in err and "--overwrite" in err, err
    assert [p.name for p in out.iterdir()] == ["config.json"] and (out / "config.json").read_text() == '{"mine": true}'

    assert export_main(["--checkpoint", str(trained_ckpt), "--output", str(out), "--overwrite"]) == 0
    assert (out / "open_clip_model.safetensors").is_file() and (out / EXPORT_MARKER).is_file()


def test_export_into_an_empty_folder_or_its_own_earlier_export_needs_no_flag(trained_ckpt, tmp_path):
    out = tmp_path / "export"
    out.mkdir()  # empty: nothing to lose
    assert export_main(["--checkpoint", str(trained_ckpt), "--output", str(out)]) == 0
    marker = json.loads((out / EXPORT_MARKER).read_text())
    assert set(marker["files"]) == {p.name for p in out.iterdir()} - {EXPORT_MARKER}
    # An earlier export wrote a file this one does not (listed in its marker); the user added notes of their own.
    marker["files"].append("vocab.txt")
    (out / EXPORT_MARKER).write_text(json.dumps(marker))
    (out / "vocab.txt").write_text("stale")
    (out / "notes.md").write_text("mine")
    assert export_main(["--checkpoint", str(trained_ckpt), "--output", str(out)]) == 0
    assert not (out / "vocab.txt").exists(), "a file of the earlier export that this one does not write is removed"
    assert (out / "notes.md").read_text() == "mine", "files the export did not write are left alone"
    assert json.loads((out / EXPORT_MARKER).read_text())["files"] == marker["files"][:-1]


# ---------------------------------------------------------------------------------------------- a moved export


def _move(folder: Path, destination: Path) -> Path:
    """``shutil.move`` to ``destination`` (another parent folder), with nothing left at the old place."""
    destination.parent.mkdir(parents=True)
    moved = Path(shutil.move(str(folder), str(destination)))
    assert not folder.exists()
    shutil.rmtree(folder.parent)
    return moved


def test_a_moved_export_loads_with_our_loader(trained_ckpt, tmp_path):
    from medclip_train.model.loading import load_model

    folder = export_checkpoint(str(trained_ckpt), str(tmp_path / "old" / "export"))
    moved = _move(folder, tmp_path / "new" / "moved")
    loaded = load_model(f"local-dir:{moved}")
    _assert_same_features(trained_ckpt, _images(), loaded)


def test_a_moved_export_with_an_edited_text_path_names_what_to_fix(trained_ckpt, tmp_path):
    from medclip_train.model.loading import load_model

    folder = export_checkpoint(str(trained_ckpt), str(tmp_path / "old" / "export"))
    moved = _move(folder, tmp_path / "new" / "moved")
    (moved / "config.json").unlink()  # no copy of the text tower config left to fall back to
    with pytest.raises(FileNotFoundError) as err:
        load_model(f"local-dir:{moved}")
    message = str(err.value)
    assert "\n" not in message and "text_cfg.hf_model_name" in message and str(folder) in message


def test_export_with_a_hub_id_loads_anywhere_with_open_clip(trained_ckpt, tmp_path):
    hub_id = "medclip-tests/tiny-export"
    folder = export_checkpoint(str(trained_ckpt), str(tmp_path / "old" / "export"), hub_id=hub_id)
    text_cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert text_cfg["hf_model_name"] == text_cfg["hf_tokenizer_name"] == hub_id
    for path in folder.iterdir():  # what gets uploaded names no local path (the checkpoint's is in tmp_path too)
        if path.suffix in (".json", ".txt"):
            assert str(tmp_path) not in path.read_text() and str(trained_ckpt.parent) not in path.read_text(), path
    # The pushed repo as huggingface_hub's cache holds it after a download (upload_folder sends the folder as is);
    # offline, so that only the cache can answer.
    repo = tmp_path / "hub_cache" / "models--medclip-tests--tiny-export"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    moved = _move(folder, tmp_path / "new" / "moved")
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub_cache")}
    for name in (f"local-dir:{moved}", f"hf-hub:{hub_id}"):
        _assert_same_features(trained_ckpt, _images(), _open_clip_in_fresh_process(name, _images(), tmp_path, **env))


# ------------------------------------------------------------------------------------------------ remote code


def _remote_code_tower(folder: Path, marker: Path, model_type: str = "bert") -> Path:
    """The tiny BERT config, with an ``auto_map`` to a module of the folder that leaves ``marker`` when imported."""
    from medclip_train.presets import HF_CONFIG_DIR

    folder.mkdir(parents=True)
    config = json.loads((HF_CONFIG_DIR / "bert-tiny" / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "remote_code.RemoteConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "remote_code.py").write_text(
        "from pathlib import Path\n\n"
        f"Path({str(marker)!r}).write_text('remote code ran')\n\n"
        "from transformers import BertConfig\n\n\n"
        "class RemoteConfig(BertConfig):\n"
        f"    model_type = {model_type!r}\n"
    )
    return folder


def _checkpoint_asking_for_remote_code(trained_ckpt: Path, tower: Path, path: Path) -> Path:
    """``trained_ckpt`` whose saved model config names ``tower`` and says ``trust_remote_code: true``; no pickle."""
    ckpt = torch.load(trained_ckpt, map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["clip"].update(text_model=str(tower), trust_remote_code=True)
    torch.save(ckpt, path)
    return path


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """transformers copies remote code into HF_MODULES_CACHE before importing it: keep that out of the home folder."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    return tmp_path / "hf_modules"


def test_a_checkpoint_cannot_turn_on_remote_code(trained_ckpt, tmp_path, modules_cache, capsys):
    from medclip_train.evaluation.cli import load_for_eval

    marker = tmp_path / "ran.txt"
    # Unique folder names: transformers names the imported module after the folder.
    tower = _remote_code_tower(tmp_path / f"tower_{tmp_path.name}", marker)
    ckpt = _checkpoint_asking_for_remote_code(trained_ckpt, tower, tmp_path / "asks.ckpt")
    loaded = load_for_eval(str(ckpt), None, "cpu")  # medclip-eval --model asks.ckpt
    assert not marker.exists()
    _assert_same_features(trained_ckpt, _images(), loaded)  # loaded safely: transformers' own BertConfig
    assert export_main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "export")]) == 0
    assert not marker.exists()


def test_a_text_tower_that_needs_remote_code_is_refused_in_one_line(trained_ckpt, tmp_path, modules_cache, capsys):
    from medclip_train.evaluation.cli import load_for_eval
    from medclip_train.evaluation.errors import EvalInputError

    marker = tmp_path / "ran.txt"
    tower = _remote_code_tower(tmp_path / f"tower_{tmp_path.name}", marker, model_type="remote-bert")
    ckpt = _checkpoint_asking_for_remote_code(trained_ckpt, tower, tmp_path / "asks.ckpt")
    with pytest.raises(EvalInputError) as err:
        load_for_eval(str(ckpt), None, "cpu")
    assert "\n" not in str(err.value) and "--trust-remote-code" in str(err.value) and str(tower) in str(err.value)
    assert export_main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--trust-remote-code" in err, err
    assert not marker.exists()


def test_an_open_clip_folder_cannot_turn_on_remote_code(trained_ckpt, tmp_path, modules_cache):
    from medclip_train.model.loading import load_model

    marker = tmp_path / "ran.txt"
    folder = export_checkpoint(str(trained_ckpt), str(tmp_path / f"export_{tmp_path.name}"))
    # The text config and the tokenizer both map to the folder's own code; the config asks open_clip to pass
    # trust_remote_code to transformers' tokenizer loader (open_clip forwards text_cfg.tokenizer_kwargs).
    _remote_code_tower(tmp_path / "tower", marker)
    shutil.copy(tmp_path / "tower" / "remote_code.py", folder / "remote_code.py")
    (folder / "remote_code.py").write_text(
        (folder / "remote_code.py").read_text()
        + "\n\nfrom transformers import PreTrainedTokenizerFast\n\n\nclass RemoteTokenizer(PreTrainedTokenizerFast):\n"
        "    pass\n"
    )
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "remote_code.RemoteConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": [None, "remote_code.RemoteTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    open_clip_config = json.loads((folder / "open_clip_config.json").read_text())
    open_clip_config["model_cfg"]["text_cfg"]["tokenizer_kwargs"] = {"trust_remote_code": True}
    (folder / "open_clip_config.json").write_text(json.dumps(open_clip_config))

    try:
        loaded = load_model(f"local-dir:{folder}")
    except ValueError as err:  # refused is as good as loaded safely, if it says how to opt in
        assert "--trust-remote-code" in str(err) and "\n" not in str(err)
    else:
        _assert_same_features(trained_ckpt, _images(), loaded)
    assert not marker.exists()


REMOTE_CODE_WITH_THE_FLAG = """
import json, sys
from pathlib import Path
from medclip_train.evaluation import cli
from medclip_train.export import main as export_main
how, source, marker = sys.argv[1], sys.argv[2], Path(sys.argv[3])
if how == "eval":
    args = cli.build_parser().parse_args(["zeroshot", "--model", source, "--data", "x", "--trust-remote-code"])
    cli.load_for_eval(args.model, None, "cpu", args.trust_remote_code)
else:
    assert export_main(["--checkpoint", source, "--output", sys.argv[4], "--trust-remote-code"]) == 0
print(json.dumps({"ran": marker.exists()}))
"""


@pytest.mark.parametrize("how", ["eval", "export"])
def test_the_users_flag_turns_remote_code_on(trained_ckpt, tmp_path, how):
    # A fresh process each: the remote module is imported once per process, and the test's own stays clean.
    marker = tmp_path / "ran.txt"
    tower = _remote_code_tower(tmp_path / f"tower_{how}", marker)
    ckpt = _checkpoint_asking_for_remote_code(trained_ckpt, tower, tmp_path / "asks.ckpt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_WITH_THE_FLAG, how, str(ckpt), str(marker), str(tmp_path / "export")],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"ran": True}


def test_init_from_a_checkpoint_does_not_take_its_trust_remote_code(trained_ckpt, tmp_path, tiny_tokenizer_dir):
    from medclip_train.model.factory import build_model

    marker = tmp_path / "ran.txt"
    tower = _remote_code_tower(tmp_path / f"tower_{tmp_path.name}", marker, model_type="remote-bert")
    ckpt = _checkpoint_asking_for_remote_code(trained_ckpt, tower, tmp_path / "asks.ckpt")
    built = build_model(ModelConfig(preset="tiny", tokenizer=str(tiny_tokenizer_dir), init_from=str(ckpt)))
    assert not marker.exists()
    assert type(built.model.text.transformer.config).__name__ == "BertConfig"  # the user's config, not the file's


def test_a_checkpoint_keeps_its_architecture_and_a_preset_changed_since_is_refused(trained_ckpt, monkeypatch):
    """A checkpoint is rebuilt by preset name: if a later version's preset pools the image tokens otherwise, every
    tensor still loads and the model computes other features, silently. The checkpoint records the open_clip config
    it was trained with; loading it for evaluation and resuming it refuse a preset that now builds another one."""
    from medclip_train.config import ModelConfig
    from medclip_train.model.factory import resolve_open_clip_cfg
    from medclip_train.model.loading import load_project_checkpoint
    from medclip_train.presets import PRESETS
    from medclip_train.resume import ResumeMismatch, check_resume, read_resume_state

    ckpt = torch.load(trained_ckpt, map_location="cpu", weights_only=True)
    clip = ckpt["hyper_parameters"]["clip"]
    assert ckpt["architecture"]["model_cfg"] == resolve_open_clip_cfg(ModelConfig(**clip))[0]
    load_project_checkpoint(trained_ckpt)  # the same version: loads

    # a later version whose tiny preset averages the patch tokens instead of taking the class token
    monkeypatch.setitem(PRESETS["tiny"]["model_cfg"]["vision_cfg"], "timm_pool", "avg")
    expected = r"model\.clip\.preset: preset 'tiny' now builds vision_cfg\.timm_pool='avg', but this checkpoint was "
    with pytest.raises(ValueError, match=expected + r"trained with ''"):
        load_project_checkpoint(trained_ckpt)
    with pytest.raises(ResumeMismatch, match=expected):
        check_resume(read_resume_state(str(trained_ckpt)), clip, None, [])
