"""``torchrun --nproc-per-node 2 ... suite``: encoding split over 2 gloo ranks gives the features and figures of one
process; shards come back in shard order whatever the loader workers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from medclip_train.evaluation.datasets import open_classification
from medclip_train.evaluation.features import Encoder
from tests.evaluation.conftest import BREASTMNIST_ENTRY, write_image_folder
from tests.evaluation.test_datasets import write_clip_benchmark_folder
from tests.evaluation.test_suite_cli import BREASTMNIST, checkpoint

REPO = Path(__file__).resolve().parents[2]


def test_shards_come_back_in_shard_order_whatever_the_loader_workers(tmp_path, tiny_clip):
    data = open_classification(write_clip_benchmark_folder(tmp_path / "cb"))  # 2 shards: 5 + 4 samples
    encode = {
        workers: Encoder(tiny_clip.model, tiny_clip.tokenizer, tiny_clip.preprocess, batch_size=2, workers=workers)
        for workers in (0, 2)
    }
    one, two = (encode[w].images(data.source) for w in (0, 2))
    assert one.keys == two.keys == [f"{i:05d}" for i in range(9)]  # 2 workers interleave the shards batch by batch
    assert torch.allclose(one.features, two.features, atol=1e-6)
    assert encode[2].images(data.source, max_samples=6).keys == one.keys[:6]


def clean_env() -> dict[str, str]:
    """This environment without a launcher's variables (a CI job may itself run under torchrun or SLURM)."""
    launcher = (
        "SLURM_",
        "RANK",
        "LOCAL_RANK",
        "GROUP_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "MASTER_",
        "TORCHELASTIC",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    # One thread, as torchrun sets it per rank: a CPU kernel's reduction order depends on the thread count.
    return {**env, "PYTHONPATH": str(REPO), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def run(command: list, log: Path) -> None:
    with log.open("w") as out:
        proc = subprocess.run([str(c) for c in command], cwd=REPO, env=clean_env(), stdout=out, stderr=out, timeout=600)
    assert proc.returncode == 0, log.read_text()[-3000:]


@pytest.mark.slow
def test_two_ranks_give_the_features_and_figures_of_one_process(tmp_path, tiny_tokenizer_dir):
    model = checkpoint(tmp_path / "model_1.ckpt", tiny_tokenizer_dir, 1)
    root = tmp_path / "data"
    write_image_folder(root / "organs", ["brain", "lung", "lymph"], per_class=5, seed=3)  # 15: ranks get 8 and 7
    (root / "medmnist").mkdir()
    shutil.copy(BREASTMNIST, root / "medmnist" / "breastmnist.npz")
    write_clip_benchmark_folder(root / "cb")  # 2 shards: one per rank
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        yaml.safe_dump(
            {
                "settings": {"folds": 2, "shots": [1], "knn_k": 3},
                "datasets": [
                    {"name": "organs", "layout": "imagefolder", "path": "organs", "modality": "histology"},
                    BREASTMNIST_ENTRY,
                    {"name": "cb", "layout": "clip_benchmark", "path": "cb", "modality": "photo"},
                ],
            }
        )
    )
    suite = ["-m", "medclip_train.evaluation.cli", "suite", "--models", model, "--catalog", catalog]
    # Batches of one: the split changes which images share a batch, and on CPU that moves features by ~1e-7 (the
    # kernels' reduction order depends on the batch); per image, the two runs must then agree to the bit.
    suite += ["--data-root", root, "--device", "cpu", "--no-progress", "--batch-size", "1"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    run([*torchrun, *suite, "--output", tmp_path / "two"], tmp_path / "two.log")
    run([sys.executable, *suite, "--output", tmp_path / "one", "--workers", "0"], tmp_path / "one.log")

    caches = {n: sorted((tmp_path / n / "feature_cache").glob("*.pt")) for n in ("one", "two")}
    assert [p.name for p in caches["one"]] == [p.name for p in caches["two"]]  # same keys: same data, same model
    assert len([p for p in caches["one"] if p.name.startswith("images-")]) == 3
    for a, b in zip(caches["one"], caches["two"]):
        one, two = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
        assert one.get("keys") == two.get("keys") and one.get("metas") == two.get("metas")
        assert torch.equal(one["features"], two["features"]), a.name
    outputs = {n: json.loads((tmp_path / n / "results.json").read_text()) for n in ("one", "two")}
    assert outputs["one"]["ranks"] == 1 and outputs["two"]["ranks"] == 2
    assert outputs["one"]["results"] == outputs["two"]["results"]
    assert (tmp_path / "two" / "report.md").is_file() and (tmp_path / "two" / "plots").is_dir()
