"""The feature cache: a second evaluation of the same model on the same data does not call the encoder."""

from __future__ import annotations

import os

import torch

from medclip_train.evaluation.datasets import ImageFolderSource, open_retrieval
from medclip_train.evaluation.features import Encoder, FeatureCache, model_fingerprint, transform_fingerprint


class CountingModel(torch.nn.Module):
    """Wraps a CLIP model and counts encoder calls."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.image_calls, self.text_calls = inner, 0, 0

    def encode_image(self, images, normalize=False):
        self.image_calls += 1
        return self.inner.encode_image(images, normalize=normalize)

    def encode_text(self, tokens, normalize=False):
        self.text_calls += 1
        return self.inner.encode_text(tokens, normalize=normalize)


def make_encoder(tiny_clip, cache_dir, model=None):
    model = model or CountingModel(tiny_clip.model)
    return Encoder(model, tiny_clip.tokenizer, tiny_clip.preprocess, batch_size=4, cache=FeatureCache(cache_dir))


def test_second_run_reads_the_cache(tiny_clip, image_folder, project_shards, tmp_path):
    first = make_encoder(tiny_clip, tmp_path / "cache")
    images = first.images(ImageFolderSource(image_folder))
    texts = first.texts(["a chest x-ray", "an MRI of the brain"])
    assert first.model.image_calls == 3 and first.model.text_calls == 1

    second = make_encoder(tiny_clip, tmp_path / "cache")
    again = second.images(ImageFolderSource(image_folder))
    assert torch.equal(again.features, images.features) and again.keys == images.keys and again.metas == images.metas
    assert torch.equal(second.texts(["a chest x-ray", "an MRI of the brain"]), texts)
    assert second.model.image_calls == 0 and second.model.text_calls == 0

    second.images(open_retrieval(project_shards))  # other data: encoded
    assert second.model.image_calls == 3


def test_cache_misses_when_data_or_weights_change(tiny_clip, image_folder, tmp_path):
    make_encoder(tiny_clip, tmp_path / "cache").images(ImageFolderSource(image_folder))
    touched = next(image_folder.glob("red/*.png"))
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    encoder = make_encoder(tiny_clip, tmp_path / "cache")
    encoder.images(ImageFolderSource(image_folder))
    assert encoder.model.image_calls == 3

    changed = CountingModel(tiny_clip.model)
    before = model_fingerprint(changed)
    with torch.no_grad():
        tiny_clip.model.logit_scale.add_(1.0)
    try:
        assert model_fingerprint(changed) != before
        encoder = make_encoder(tiny_clip, tmp_path / "cache", changed)
        encoder.images(ImageFolderSource(image_folder))
        assert encoder.model.image_calls == 3
    finally:
        with torch.no_grad():
            tiny_clip.model.logit_scale.sub_(1.0)


def test_transform_fingerprint_is_stable_across_processes(tiny_clip):
    assert " at 0x" not in transform_fingerprint(tiny_clip.preprocess)
    assert "Resize(size=160" in transform_fingerprint(tiny_clip.preprocess)
