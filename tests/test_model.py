"""The model factory: presets build, BiomedCLIP's architecture, locking, checkpointing, errors. No downloads."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from medclip_train.config import ModelConfig
from medclip_train.model import PRESETS, build_model, get_preset
from medclip_train.model.factory import validate_model_config
from medclip_train.presets import OPENAI_MEAN, OPENAI_STD, PUBMEDBERT

BIOMEDCLIP = "biomedclip_vit_b16_pubmedbert256"

# open_clip_config.json of microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 as published on the Hub.
# It names the text tower by its old id: Microsoft renamed PubMedBERT to BiomedBERT in Nov. 2023 (model card:
# "This model was previously named PubMedBERT (abstracts)"); the Hub redirects the old id, our preset uses the new.
PUBLISHED_BIOMEDCLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 512,
        "vision_cfg": {
            "timm_model_name": "vit_base_patch16_224",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 224,
        },
        "text_cfg": {
            "hf_model_name": "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract",
            "hf_tokenizer_name": "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract",
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": 256,
        },
    },
    "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)},
}
RENAMED = {"microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract": PUBMEDBERT}


@pytest.fixture(scope="module")
def bert_base_dir(tmp_path_factory):
    """A local BERT-base ``config.json`` (the shape of PubMedBERT's), so the hub presets build offline."""
    from transformers import BertConfig

    path = tmp_path_factory.mktemp("bert_base")
    BertConfig().save_pretrained(path)  # 12 layers, 768 wide, 512 positions, 30522 tokens
    return path


@pytest.fixture
def hub_offline_empty_cache(monkeypatch, tmp_path):
    """``HF_HUB_OFFLINE=1`` and an empty ``HF_HOME``; huggingface_hub reads both at import, so patch its constants."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HOME", str(tmp_path))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def _tiny(tokenizer_dir, **overrides):
    return build_model(ModelConfig(preset="tiny", tokenizer=str(tokenizer_dir), **overrides))


def _captions(built, texts=("Mild cardiomegaly.", "No pneumothorax or pleural effusion.")):
    return built.tokenizer(list(texts))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds(preset, tiny_tokenizer_dir, bert_base_dir):
    # Hub text towers are replaced by a local config of the same shape; weights stay random (no download).
    text_model = str(bert_base_dir) if PRESETS[preset]["model_cfg"]["text_cfg"]["hf_model_name"] == PUBMEDBERT else None
    built = build_model(ModelConfig(preset=preset, tokenizer=str(tiny_tokenizer_dir), text_model=text_model))
    embed_dim = built.model_cfg["embed_dim"]
    assert built.model.visual.head.proj.out_features == embed_dim
    assert built.model.text.proj[-1].out_features == embed_dim
    assert built.preprocess_cfg["size"] == built.model_cfg["vision_cfg"]["image_size"]
    assert built.tokenizer.context_length == built.model_cfg["text_cfg"]["context_length"]


def test_tiny_forward(tiny_tokenizer_dir):
    built = _tiny(tiny_tokenizer_dir)
    model = built.model.eval()
    text = _captions(built)
    assert text.shape == (2, 64) and (text[:, 0] == 2).all()  # [CLS] first, [PAD]=0 after [SEP]
    with torch.no_grad():
        out = model(torch.randn(2, 3, 160, 160), text)
    assert set(out) == {"image_features", "text_features", "logit_scale"}
    assert out["image_features"].shape == (2, 128) and out["text_features"].shape == (2, 128)
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(out[key].norm(dim=-1), torch.ones(2))
    # open_clip returns the exponentiated scale (what the losses expect), initialised to 1 / 0.07.
    assert out["logit_scale"].ndim == 0
    torch.testing.assert_close(out["logit_scale"], model.logit_scale.exp())
    torch.testing.assert_close(out["logit_scale"], torch.tensor(1 / 0.07))


def test_text_tower_uses_sdpa(tiny_tokenizer_dir):
    built = _tiny(tiny_tokenizer_dir)
    assert built.model.text.transformer.config._attn_implementation == "sdpa"


def test_biomedclip_preset_matches_the_architecture():
    preset = get_preset(BIOMEDCLIP)
    model_cfg, preprocess = preset["model_cfg"], preset["preprocess_cfg"]
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    assert model_cfg["embed_dim"] == 512
    assert vision["timm_model_name"] == "vit_base_patch16_224"
    assert vision["timm_model_pretrained"] is False
    assert vision["timm_pool"] == "" and vision["timm_proj"] == "linear"
    assert vision["image_size"] == 224
    assert text["hf_model_name"] == text["hf_tokenizer_name"] == "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
    assert text["hf_proj_type"] == "mlp"
    assert text["hf_pooler_type"] == "cls_last_hidden_state_pooler"
    assert text["context_length"] == 256
    assert tuple(preprocess["mean"]) == (0.48145466, 0.4578275, 0.40821073)
    assert tuple(preprocess["std"]) == (0.26862954, 0.26130258, 0.27577711)


def test_biomedclip_preset_equals_published_open_clip_config():
    preset = get_preset(BIOMEDCLIP)
    published = copy.deepcopy(PUBLISHED_BIOMEDCLIP_CONFIG)
    text_cfg = published["model_cfg"]["text_cfg"]
    for key in ("hf_model_name", "hf_tokenizer_name"):
        text_cfg[key] = RENAMED[text_cfg[key]]
    assert preset["model_cfg"] == published["model_cfg"]
    for key in ("mean", "std"):
        assert list(preset["preprocess_cfg"][key]) == published["preprocess_cfg"][key]


def test_biomedclip_towers_have_the_published_shapes(tiny_tokenizer_dir, bert_base_dir):
    import timm

    assert timm.is_model("vit_base_patch16_224")
    built = build_model(
        ModelConfig(preset=BIOMEDCLIP, tokenizer=str(tiny_tokenizer_dir), text_model=str(bert_base_dir))
    )
    model = built.model
    trunk = model.visual.trunk
    assert type(trunk).__name__ == "VisionTransformer" and len(trunk.blocks) == 12 and trunk.embed_dim == 768
    assert trunk.patch_embed.patch_size == (16, 16) and trunk.num_classes == 0  # open_clip's head replaces timm's
    assert sum(p.numel() for p in trunk.parameters()) == 85_798_656
    assert (model.visual.head.proj.in_features, model.visual.head.proj.out_features) == (768, 512)
    # mlp projection: 768 -> (768 + 512) // 2 -> 512, without biases; pooler: CLS of the last hidden state.
    shapes = [tuple(m.weight.shape) for m in model.text.proj if hasattr(m, "weight")]
    assert shapes == [(640, 768), (512, 640)]
    assert type(model.text.pooler).__name__ == "ClsLastHiddenStatePooler"
    assert model.text.transformer.pooler is None  # BERT's own pooler is not built (unused)


def test_lock_text_leaves_last_layer_and_projection_trainable(tiny_tokenizer_dir):
    built = _tiny(tiny_tokenizer_dir, lock_text=True, lock_text_unlocked_layers=1)
    trainable = {name for name, p in built.model.text.named_parameters() if p.requires_grad}
    assert trainable, "nothing trainable"
    assert all(name.startswith(("transformer.encoder.layer.1.", "proj.")) for name in trainable), trainable
    last_layer = {
        f"transformer.encoder.layer.1.{n}" for n, _ in built.model.text.transformer.encoder.layer[1].named_parameters()
    }
    proj = {f"proj.{n}" for n, _ in built.model.text.proj.named_parameters()}
    assert trainable == last_layer | proj
    # The image tower is untouched.
    assert all(p.requires_grad for p in built.model.visual.parameters())


def test_open_clip_lock_cannot_unlock_bert_layers(tiny_tokenizer_dir):
    # The gap the factory's lock_text_tower fills: open_clip's arch table has no BERT layer attribute.
    built = _tiny(tiny_tokenizer_dir)
    with pytest.raises(KeyError, match="layer_attr"):
        built.model.text.lock(1)


def test_lock_image_freezes_trunk_not_head(tiny_tokenizer_dir):
    built = _tiny(tiny_tokenizer_dir, lock_image=True)
    visual = built.model.visual
    assert not any(p.requires_grad for p in visual.trunk.parameters())
    assert all(p.requires_grad for p in visual.head.parameters())
    assert all(p.requires_grad for p in built.model.text.parameters())


@pytest.mark.parametrize("locked", [False, True], ids=["free", "locked"])
def test_grad_checkpointing_backward(tiny_tokenizer_dir, locked):
    # Locked towers are the classic trap: checkpointed blocks whose inputs need no grad can silently drop grads.
    locks = dict(lock_text=True, lock_text_unlocked_layers=1, lock_image=True, lock_image_unlocked_groups=1)
    built = _tiny(tiny_tokenizer_dir, grad_checkpointing=True, **(locks if locked else {}))
    model = built.model.train()
    assert model.visual.trunk.grad_checkpointing
    # What transformers' is_(activation|gradient)_checkpointing checks, without its version-dependent name.
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in model.text.transformer.modules())
    out = model(torch.randn(2, 3, 160, 160), _captions(built))
    logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
    F.cross_entropy(logits, torch.arange(2)).backward()
    without_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert without_grad == []


def test_unknown_preset_names_the_field():
    with pytest.raises(ValueError, match=r"model\.clip\.preset: unknown preset 'no_such_preset'"):
        ModelConfig(preset="no_such_preset")


def test_unknown_timm_model_names_the_field(monkeypatch, tiny_tokenizer_dir):
    bad = get_preset("tiny")
    bad["model_cfg"]["vision_cfg"]["timm_model_name"] = "no_such_vit"
    monkeypatch.setitem(PRESETS, "bad_timm", bad)
    with pytest.raises(ValueError, match=r"model\.clip\.preset='bad_timm': its image tower 'no_such_vit'"):
        validate_model_config(ModelConfig(preset="bad_timm", tokenizer=str(tiny_tokenizer_dir)))


def test_context_length_above_position_embeddings_names_the_field(tiny_tokenizer_dir):
    with pytest.raises(ValueError, match=r"model\.clip\.context_length=129.*max_position_embeddings=128"):
        build_model(ModelConfig(preset="tiny", tokenizer=str(tiny_tokenizer_dir), context_length=129))


def test_missing_tokenizer_names_the_field():
    with pytest.raises(ValueError, match=r"model\.clip\.tokenizer: preset 'tiny' has no tokenizer"):
        build_model(ModelConfig(preset="tiny"))


@pytest.mark.parametrize("entry", [build_model, validate_model_config], ids=["build_model", "validate"])
def test_offline_missing_hub_model_says_what_and_how(entry, hub_offline_empty_cache):
    with pytest.raises(FileNotFoundError) as info:
        entry(ModelConfig(preset=BIOMEDCLIP))
    message = str(info.value)
    assert PUBMEDBERT in message and "'config.json'" in message  # what is missing
    assert "HF_HUB_OFFLINE=1" in message
    assert "point model.clip.text_model at" in message and "local folder" in message  # how to fix it


def test_image_pool_max_takes_the_largest_patch_feature(tiny_tokenizer_dir):
    """``model.clip.image_pool max``: the image feature before the projection is the max over the patch tokens of
    timm's trunk (checked against the trunk's own token outputs), not its class token."""
    torch.manual_seed(0)
    built = build_model(ModelConfig(preset="tiny", tokenizer=str(tiny_tokenizer_dir), image_pool="max"))
    trunk = built.model.visual.trunk
    images = torch.randn(2, 3, 160, 160)
    tokens = trunk.forward_features(images)
    expected = tokens[:, trunk.num_prefix_tokens :].amax(dim=1)
    with torch.no_grad():
        assert torch.allclose(built.model.visual(images), built.model.visual.head(expected), atol=1e-6)
    cls_built = build_model(ModelConfig(preset="tiny", tokenizer=str(tiny_tokenizer_dir)))
    assert cls_built.model.visual.trunk.global_pool == "token" and trunk.global_pool == "max"


def test_unknown_image_pool_names_the_field():
    with pytest.raises(ValueError, match=r"model\.clip\.image_pool: unknown pooling 'mean'; known: \['token'"):
        ModelConfig(image_pool="mean")


def test_init_from_weights_trained_with_another_pooling_is_refused(tiny_tokenizer_dir, tmp_path):
    """Pooling has no weights: a checkpoint of a max-pooling model loads every tensor into a class-token model, which
    then computes other image features than the trained one. Refused naming the flag; accepted with it."""
    import json
    from dataclasses import asdict

    from safetensors.torch import save_file

    from medclip_train.model.factory import resolve_open_clip_cfg

    trained_cfg = ModelConfig(preset="tiny", tokenizer=str(tiny_tokenizer_dir), image_pool="max")
    trained = build_model(trained_cfg).model
    ckpt = tmp_path / "max.ckpt"
    state = {f"model.{k}": v for k, v in trained.state_dict().items()}
    torch.save({"hyper_parameters": {"clip": asdict(trained_cfg)}, "state_dict": state}, ckpt)
    export = tmp_path / "export"
    export.mkdir()
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(export / "open_clip_model.safetensors"))
    model_cfg, _ = resolve_open_clip_cfg(trained_cfg)
    (export / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))

    for source in (str(ckpt), f"local-dir:{export}"):
        with pytest.raises(ValueError, match=r"pooling 'max'.*by 'token': set --model\.clip\.image_pool max"):
            build_model(ModelConfig(preset="tiny", tokenizer=str(tiny_tokenizer_dir), init_from=source))
        built = build_model(
            ModelConfig(preset="tiny", tokenizer=str(tiny_tokenizer_dir), init_from=source, image_pool="max")
        )
        images = torch.randn(2, 3, 160, 160)
        with torch.no_grad():
            assert torch.equal(built.model.eval().encode_image(images), trained.eval().encode_image(images))
