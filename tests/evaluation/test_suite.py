"""``evaluate_suite``: the flat metrics training logs."""

from __future__ import annotations

from medclip_train.evaluation.suite import evaluate_suite


def test_flat_metric_names_and_mode_restored(tiny_clip, image_folder, project_shards):
    model = tiny_clip.model.train()
    try:
        metrics = evaluate_suite(
            model,
            tiny_clip.tokenizer,
            tiny_clip.preprocess,
            [str(image_folder)],
            project_shards,
            batch_size=8,
            max_samples=6,
        )
        assert model.training
    finally:
        model.eval()
    for name in ("top1", "balanced_acc", "macro_f1", "auroc"):
        assert 0 <= metrics[f"zeroshot/colours/{name}"] <= 1
    assert "zeroshot/colours/top5" not in metrics  # 3 classes
    for direction in ("i2t", "t2i"):
        for k in (1, 5, 10):
            assert 0 <= metrics[f"retrieval/{direction}_R@{k}"] <= 1
    assert metrics["retrieval/t2i_R@10"] == 1.0  # max_samples=6: 6 candidates, all within the top 10
    assert all(isinstance(v, float) for v in metrics.values())
