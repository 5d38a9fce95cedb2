"""The reliability matrix of RELIABILITY.md: bad data, crashes, bad configs, untrusted files.

Rows covered elsewhere are named in RELIABILITY.md (test_datamodule, test_resume, test_precision, test_ddp_cli).
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from medclip_train.callbacks import AtomicCheckpointIO
from medclip_train.config import ModelConfig
from medclip_train.data.datamodule import WebDataModule
from medclip_train.data.decode import SampleError, decode_image
from medclip_train.model.factory import build_tokenizer, resolve_open_clip_cfg
from medclip_train.module import CLIPModule
from tests.shardkit import add_member, make_shards, shard_pattern
from tests.training.conftest import (
    KeyRecorder,
    bare_trainer,
    callback_arg,
    fit_args,
    read_keys,
    read_summary,
    run_cli,
    train_py,
)


# ---- data ------------------------------------------------------------------------------------------------------------
def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header declaring ``width x height`` RGB pixels, with one tiny IDAT: a few hundred bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def image_bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_png_bomb_is_refused_without_decoding():
    with pytest.raises(SampleError, match="decompression bomb"):
        decode_image(png_bomb(), 160)


def test_16bit_png_decodes_windowed_to_its_range():
    ramp = np.tile(np.linspace(1000, 3000, 64).astype(np.uint16), (16, 1))  # a CT-like range, far from 0..65535
    img = decode_image(image_bytes(Image.fromarray(ramp), "PNG"), 16)
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.shape == (16, 64, 3)
    assert arr[..., 0].min() == 0 and arr[..., 0].max() == 255, "windowed by the real min..max, not 0..65535"
    assert np.all(np.diff(arr[0, :, 0].astype(int)) >= 0)


def test_cmyk_jpeg_decodes_to_its_rgb_colour():
    colour = (200, 40, 60)
    img = decode_image(image_bytes(Image.new("RGB", (32, 32), colour).convert("CMYK"), "JPEG"), 16)
    assert img.mode == "RGB"
    assert np.abs(np.asarray(img).astype(int) - colour).max() <= 8, "CMYK must not come out inverted"


def write_shard(folder: Path, samples: list[dict[str, bytes]], name: str = "train-000000.tar") -> str:
    """A shard of the given members (``{"key": ..., "jpg": ..., "txt": ...}``) with its ``sizes.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(folder / name, "w") as tf:
        for sample in samples:
            for ext, data in sample.items():
                if ext != "key":
                    add_member(tf, f"{sample['key']}.{ext}", data)
    (folder / "sizes.json").write_text(json.dumps({name: len(samples)}))
    return str(folder / name)


def test_garbage_bytes_inside_a_tar_lose_only_the_rest_of_that_shard(tmp_path, tok):
    paths = make_shards(tmp_path, [12, 12])
    data = bytearray(paths[0].read_bytes())
    middle = len(data) // 2 // 512 * 512
    data[middle : middle + 1024] = os.urandom(1024)  # two tar blocks of noise: a header and some content
    paths[0].write_bytes(bytes(data))
    model_cfg, preprocess = resolve_open_clip_cfg(ModelConfig(preset="tiny", tokenizer=str(tok)))
    dm = WebDataModule(train=shard_pattern(paths), batch_size=4, num_workers=0, shuffle_buffer=0, max_skip_fraction=0.9)
    dm.connect(build_tokenizer(model_cfg), {**preprocess, "size": 32})
    batches = list(dm.train_dataloader())
    assert [len(b["key"]) for b in batches] == [4] * 6, "the planned batches, every one full"
    skipped = sum(int(b["skipped"]) for b in batches)
    assert 1 <= skipped <= 12
    keys = {k for b in batches for k in b["key"]}
    assert {f"train_{i:06d}" for i in range(12, 24)} <= keys, "the intact shard is read whole"


def test_bad_samples_are_skipped_counted_in_the_summary_and_good_odd_images_are_kept(tmp_path, tok):
    from tests.shardkit import sample_bytes

    good = [{"key": f"ok_{i:03d}", "jpg": sample_bytes("xray", "left", 64), "txt": b"chest x-ray"} for i in range(10)]
    grey16 = np.tile(np.linspace(0, 40000, 64).astype(np.uint16), (64, 1))
    odd_but_fine = [
        {"key": "grey16", "png": image_bytes(Image.fromarray(grey16), "PNG"), "txt": b"ct scan"},
        {
            "key": "cmyk",
            "jpg": image_bytes(Image.new("RGB", (64, 64), (90, 20, 20)).convert("CMYK"), "JPEG"),
            "txt": b"histology",
        },
    ]
    cut_jpeg = sample_bytes("ct", "right", 64)
    bad = [
        {"key": "bomb", "png": png_bomb(), "txt": b"mri"},
        {"key": "cut", "jpg": cut_jpeg[: len(cut_jpeg) // 2], "txt": b"ct scan"},
        {"key": "empty", "jpg": sample_bytes("ct", "left", 64), "txt": b"  \n"},
        {"key": "latin1", "jpg": sample_bytes("mri", "left", 64), "txt": "épanchement pleural".encode("latin-1")},
        {"key": "notext", "jpg": sample_bytes("mri", "right", 64)},
    ]
    shard = write_shard(tmp_path / "shards", good[:5] + bad + odd_but_fine + good[5:])  # 17 samples
    root = tmp_path / "run"
    # batch 17: one step reads every sample; a high threshold so the 5 bad ones of 17 do not stop the run
    options = "--data.batch_size 17 --trainer.max_steps 1 --data.max_skip_fraction 0.5".split()
    run_cli(fit_args(tok, shard, root, *options, "--trainer.callbacks+", callback_arg(KeyRecorder)))
    summary = read_summary(root)
    assert summary["steps"] == 1
    assert summary["skipped_samples"] == len(bad)
    trained = {k for record in read_keys(root) for k in record["keys"]}
    assert {"grey16", "cmyk"} <= trained, "16-bit and CMYK images are data, not errors"
    assert not trained & {s["key"] for s in bad}


# ---- process: a crash while a checkpoint is written ----------------------------------------------------------------
def _serialisation_fails(monkeypatch):
    real_save = torch.save

    def half_then_fail(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        if isinstance(f, (str, os.PathLike)):
            Path(f).write_bytes(data[: len(data) // 2])
        else:
            f.write(data[: len(data) // 2])
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(torch, "save", half_then_fail)


def _copy_across_filesystems_fails(monkeypatch):
    # Node-local /tmp and checkpoints on shared storage: rename fails with EXDEV and shutil.move copies over the
    # target; the copy then dies half way (disk full, quota, node preempted).
    def no_rename(src, dst, *args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def copy_half(src, dst, *args, **kwargs):
        data = Path(src).read_bytes()
        Path(dst).write_bytes(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "rename", no_rename)
    monkeypatch.setattr(shutil, "copyfile", copy_half)


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("crash", [_serialisation_fails, _copy_across_filesystems_fails])
def test_crash_while_writing_a_checkpoint_leaves_the_previous_one_loadable(tmp_path, monkeypatch, crash):
    trainer = bare_trainer(default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()])
    trainer.fit(_Tiny(), train_dataloaders=torch.utils.data.DataLoader(torch.randn(4, 4), batch_size=2))
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    before = path.read_bytes()
    crash(monkeypatch)
    try:
        trainer.save_checkpoint(path)
        saved = True  # the atomic writer never copies across filesystems: that crash cannot reach it
    except (RuntimeError, OSError):
        saved = False
    monkeypatch.undo()
    assert saved or path.read_bytes() == before
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"], "no temporary file left behind"


def test_cli_runs_write_checkpoints_atomically(tmp_path, shards, tok):
    from medclip_train.cli import cli_main

    cli = cli_main(fit_args(tok, shards([8]), tmp_path)[1:], run=False)  # without the subcommand: set-up only
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# ---- config: one clear message naming the field, before any heavy work -------------------------------------------
class _Built(Exception):
    pass


@pytest.fixture
def no_heavy_work(monkeypatch):
    """Building the towers (weights, the slow part) fails the test: a config error must come before it."""
    import medclip_train.model.factory as factory

    def refuse(*args, **kwargs):
        raise _Built("the towers were built before the config error was found")

    monkeypatch.setattr(factory, "CustomTextCLIP", refuse)


# Each message names the setting as the user writes it (--model.clip.preset, or model: {clip: {preset: }} in YAML).
CONFIG_ERRORS = {
    "unknown_preset": (["--model.clip.preset", "vit_h14_nonexistent"], "model.clip.preset"),
    "unknown_text_tower": (["--model.clip.text_model", "/nonexistent/pubmedbert"], "model.clip.text_model"),
    "context_too_long": (["--model.clip.context_length", "4096"], "model.clip.context_length"),
    "negative_context": (["--model.clip.context_length", "-1"], "model.clip.context_length"),
    "unknown_loss": (["--model.loss.kind", "triplet"], "model.loss.kind"),
    "unknown_schedule": (["--model.optim.schedule", "linear"], "model.optim.schedule"),
    "no_warmup_sign": (["--model.optim.warmup_steps", "-5"], "model.optim.warmup_steps"),
    "missing_shard": ([], "data.train[0].shards"),
    "missing_sizes_json": ([], "sizes.json"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_config_error_is_one_line_naming_the_field(case, tmp_path, tok, capsys, no_heavy_work):
    extra, field = CONFIG_ERRORS[case]
    paths = make_shards(tmp_path / "shards", [4, 4], image_size=32)
    pattern = shard_pattern(paths)
    if case == "missing_shard":
        pattern = str(tmp_path / "shards" / "train-{000000..000002}.tar")
    if case == "missing_sizes_json":
        (tmp_path / "shards" / "sizes.json").unlink()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(fit_args(tok, pattern, tmp_path / "run", *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and field in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "last.ckpt").exists()


def test_config_error_in_a_real_process_is_one_line_and_exit_code_2(tmp_path, tok):
    make_shards(tmp_path / "shards", [4], image_size=32)
    proc = train_py(fit_args(tok, str(tmp_path / "shards" / "train-{000000..000001}.tar"), tmp_path / "run"))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: data.train[0].shards: missing shard(s)")


def test_labels_vocabulary_not_matching_the_checkpoint_is_named_before_training(tmp_path, shards, tok, capsys):
    pattern = shards([8, 8])
    root = tmp_path / "run"
    run_cli(fit_args(tok, pattern, root, "--data.label_top_k", "3", "--trainer.max_steps", "2"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(
            fit_args(tok, pattern, root, "--data.label_top_k", "5", "--trainer.max_steps", "4", "--ckpt_path", "last")
        )
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "error: data.label_top_k" in err and "(5 labels)" in err and "(3 labels)" in err
    assert read_summary(root)["steps"] == 2, "no step was trained with the wrong vocabulary"


# ---- security ------------------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this runs code: it creates the file ``marker`` (a stand-in for anything worse)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture(scope="module")
def tiny_module(tiny_tokenizer_dir):
    return CLIPModule(ModelConfig(preset="tiny", tokenizer=str(tiny_tokenizer_dir)))


def project_checkpoint(module: CLIPModule, path: Path, **extra) -> Path:
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(), **extra}, path)
    return path


def test_checkpoint_with_a_pickled_object_is_refused_and_its_code_never_runs(tmp_path, tiny_module):
    from medclip_train.model.loading import load_model
    from medclip_train.model.weights import load_clip_weights

    marker = tmp_path / "pwned"
    path = project_checkpoint(tiny_module, tmp_path / "evil.ckpt", extra=_Payload(str(marker)))
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_model(str(path))
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_clip_weights(tiny_module.model, str(path))
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the test's own check that the payload is live
    assert marker.exists()


def test_plain_checkpoint_loads(tmp_path, tiny_module):
    from medclip_train.model.loading import load_model

    loaded = load_model(str(project_checkpoint(tiny_module, tmp_path / "ok.ckpt")))
    assert torch.equal(loaded.model.logit_scale, tiny_module.model.logit_scale)


def test_export_carries_no_pickle(tmp_path, tiny_module):
    from medclip_train.export import export_checkpoint

    out = export_checkpoint(str(project_checkpoint(tiny_module, tmp_path / "run.ckpt")), str(tmp_path / "export"))
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert out / "open_clip_model.safetensors" in files
    for path in files:
        assert path.suffix not in (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"), path.name
        head = path.read_bytes()[:4]
        assert not head.startswith(b"\x80") and head != b"PK\x03\x04", f"{path.name} looks like a pickle / torch zip"


def test_trust_remote_code_stays_off_unless_configured(monkeypatch, tiny_tokenizer_dir):
    import transformers

    from medclip_train.model.factory import build_model

    calls = []
    for cls in (transformers.AutoConfig, transformers.AutoModel, transformers.AutoTokenizer):
        for name in ("from_pretrained", "from_config"):
            real = getattr(cls, name, None)
            if real is None:
                continue

            def spy(*args, _real=real, _where=f"{cls.__name__}.{name}", **kwargs):
                calls.append((_where, kwargs.get("trust_remote_code", False)))
                return _real(*args, **kwargs)

            monkeypatch.setattr(cls, name, spy)
    build_model(ModelConfig(preset="tiny", tokenizer=str(tiny_tokenizer_dir)))
    assert {where for where, _ in calls} >= {"AutoConfig.from_pretrained", "AutoTokenizer.from_pretrained"}
    assert not any(trusted for _, trusted in calls), calls
    calls.clear()
    build_model(ModelConfig(preset="tiny", tokenizer=str(tiny_tokenizer_dir), trust_remote_code=True))
    assert ("AutoConfig.from_pretrained", True) in calls, "the config's choice is what reaches transformers"
