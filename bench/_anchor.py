"""open_clip's side of the benchmarks; runs in the anchor venv (open_clip 3.3 + webdataset 0.2.x), see README.md.

``python bench/_anchor.py train MODEL_JSON -- OPEN_CLIP_TRAIN_ARGS...``
    registers the model config ``MODEL_JSON`` (its file stem is the model name) and runs
    ``open_clip_train.main.main(args)``; the text tower is built from its config (random init, no weights).
``python bench/_anchor.py data --shards P --tokenizer DIR --workers W --batches N --warmup K``
    times ``open_clip_train.data.get_wds_dataset`` (train mode) and prints one JSON line.

Only the standard library, torch and open_clip are imported: nothing of this project.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time


def run_train(model_json: str, args: list[str]) -> None:
    import open_clip
    import open_clip_train.main as oc_main

    open_clip.add_model_config(model_json)
    # open_clip_train loads the HF text tower's pretrained weights by default; the bench model is random init.
    oc_main.create_model_and_transforms = functools.partial(oc_main.create_model_and_transforms, pretrained_text=False)
    oc_main.main(args)


def run_data(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shards", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--context-length", type=int, default=128)
    a = p.parse_args(argv)

    from open_clip.tokenizer import HFTokenizer
    from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2
    from open_clip_train.data import get_wds_dataset

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    cfg = PreprocessCfg(size=a.image_size, mean=mean, std=std, interpolation="bicubic", resize_mode="shortest")
    transform = image_transform_v2(cfg, is_train=True, aug_cfg=AugmentationCfg(scale=(0.9, 1.0)))
    tokenizer = HFTokenizer(a.tokenizer, context_length=a.context_length)
    args = argparse.Namespace(
        train_data=a.shards,
        train_num_samples=(a.batches + a.warmup + 1) * a.batch_size,
        dataset_resampled=False,
        train_data_upsampling_factors=None,
        seed=0,
        batch_size=a.batch_size,
        workers=a.workers,
        world_size=1,
    )
    loader = get_wds_dataset(args, transform, is_train=True, tokenizer=tokenizer).dataloader
    times, n = [], 0
    for i, (images, texts) in enumerate(loader):
        times.append(time.perf_counter())
        if i > a.warmup:
            n += images.shape[0]
        if len(times) > a.warmup + a.batches:
            break
    rate = n / (times[-1] - times[a.warmup])
    print(json.dumps({"samples_per_s": rate, "batches": len(times) - a.warmup - 1}))


def main(argv: list[str]) -> None:
    if argv[:1] == ["train"]:
        if len(argv) < 3 or argv[2] != "--":
            raise SystemExit("usage: _anchor.py train MODEL_JSON -- OPEN_CLIP_TRAIN_ARGS...")
        run_train(argv[1], argv[3:])
    elif argv[:1] == ["data"]:
        run_data(argv[1:])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
