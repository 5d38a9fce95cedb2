"""The three data layouts: image folder, CLIP_benchmark webdataset, project shards."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch

from medclip_train.evaluation.datasets import ImageFolderSource, expand_shards, open_classification, open_retrieval
from medclip_train.evaluation.errors import EvalInputError
from medclip_train.evaluation.features import Encoder
from tests.evaluation.conftest import random_image


def test_image_folder_classes_are_sorted_folder_names(image_folder):
    source = ImageFolderSource(image_folder)
    assert source.classes == ["blue", "green", "red"] and len(source) == 12
    assert {label for _, label in source.samples} == {0, 1, 2}
    data = open_classification(image_folder)
    assert data.name == "colours" and data.prompts.classnames == ["blue", "green", "red"]


def test_image_folder_errors(tmp_path, image_folder):
    with pytest.raises(EvalInputError, match="folder not found"):
        open_classification(tmp_path / "missing")
    (image_folder / "empty").mkdir()
    with pytest.raises(EvalInputError, match=r"empty.*empty class folder"):
        open_classification(image_folder)


def write_clip_benchmark_folder(root, n=9, classes=("cat", "dog", "cow")):
    """CLIP_benchmark's layout: classnames.txt, templates, test/{0..1}.tar with .webp + .cls, nshards.txt."""
    import webdataset as wds

    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(classes) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\na {c}.\n")
    rng = np.random.default_rng(0)
    for shard in range(2):
        with wds.TarWriter(str(root / "test" / f"{shard}.tar")) as writer:
            for i in range(shard * 5, min(n, shard * 5 + 5)):
                buf = io.BytesIO()
                random_image(rng, i).save(buf, format="WEBP")
                writer.write({"__key__": f"{i:05d}", "webp": buf.getvalue(), "cls": i % len(classes)})
    (root / "test" / "nshards.txt").write_text("2")
    return root


def test_clip_benchmark_layout(tmp_path, tiny_clip):
    root = write_clip_benchmark_folder(tmp_path / "cb")
    data = open_classification(root)
    assert data.classes == ["0", "1", "2"] and data.prompts.classnames == ["cat", "dog", "cow"]
    assert data.prompts.prompts_for(1) == ["a photo of a dog.", "a dog."]
    encoded = Encoder(tiny_clip.model, tiny_clip.tokenizer, tiny_clip.preprocess, batch_size=4).images(data.source)
    assert encoded.features.shape == (9, 128) and encoded.metas == [i % 3 for i in range(9)]


def test_project_shards_labels_by_prefix_and_image_less_samples_skipped(tmp_path, tiny_clip, project_shards):
    # A key-only member at the end of a shard (what webdataset 1.x yields as a sample without an image).
    shard = sorted(expand_shards(project_shards))[0]
    with tarfile.open(shard, "a") as tar:
        info = tarfile.TarInfo("zzz_orphan.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    data = open_classification(project_shards, label_prefix="modality:")
    encoded = Encoder(tiny_clip.model, tiny_clip.tokenizer, tiny_clip.preprocess, batch_size=3).images(data.source)
    assert len(encoded.keys) == 10 and "zzz_orphan" not in encoded.keys
    targets = data.targets(encoded.metas)
    assert targets.classes == sorted({"xray", "histology", "mri", "ct", "ultrasound", "dermoscopy", "fundus"})
    assert not targets.multilabel and targets.targets[0] == targets.classes.index("xray")


def test_shard_errors(tmp_path):
    with pytest.raises(EvalInputError, match="no shard file matches"):
        expand_shards(str(tmp_path / "test-*.tar"))
    with pytest.raises(EvalInputError, match="shard file not found"):
        expand_shards(str(tmp_path / "test-{000000..000001}.tar"))
    with pytest.raises(EvalInputError, match="--label-prefix"):
        open_classification(str(tmp_path / "x-*.tar"))


def test_retrieval_source_yields_captions(tiny_clip, project_shards):
    encoder = Encoder(tiny_clip.model, tiny_clip.tokenizer, tiny_clip.preprocess, batch_size=4, workers=2)
    encoded = encoder.images(open_retrieval(project_shards))
    assert sorted(encoded.keys) == [f"s{i:04d}" for i in range(10)]  # two workers: every sample exactly once
    assert all(len(m["captions"]) == 1 for m in encoded.metas)
    assert torch.allclose(encoded.features.norm(dim=1), torch.ones(10), atol=1e-5)
