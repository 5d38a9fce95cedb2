"""open_clip's side of the benchmarks; runs in the anchor venv (open_clip 3.3 + webdataset 0.2.x), see README.md.

``python bench/_anchor.py train MODEL_JSON [--step-times PATH] -- OPEN_CLIP_TRAIN_ARGS...``
    registers the model config ``MODEL_JSON`` (its file stem is the model name) and runs
    ``open_clip_train.main.main(args)``; the text tower is built from its config (random init, no weights). With
    ``--step-times``, every per-step batch time that open_clip puts into its ``batch_time_m`` meter (what its log
    lines average over each logging interval, ``Batch (t)``) is written to PATH as JSON: a per-step figure without
    changing its logging interval.
``python bench/_anchor.py local-dir MODEL_JSON OUT``
    writes OUT/open_clip_config.json, the tokenizer and OUT/text/ (the text tower's config with random-init
    weights), so that a
    plain ``python -m open_clip_train.main --model local-dir:OUT`` builds the model with open_clip's own defaults
    (it loads the text tower's "pretrained" weights from OUT/text and cannot be told not to on its command line).
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


def run_train(model_json: str, args: list[str], step_times: str | None = None) -> None:
    import open_clip
    import open_clip_train.main as oc_main

    open_clip.add_model_config(model_json)
    # open_clip_train loads the HF text tower's pretrained weights by default; the bench model is random init.
    oc_main.create_model_and_transforms = functools.partial(oc_main.create_model_and_transforms, pretrained_text=False)
    if step_times is None:
        oc_main.main(args)
        return
    recorded = _record_batch_times(oc_main)
    try:
        oc_main.main(args)
    finally:
        with open(step_times, "w") as f:
            json.dump(recorded, f)


def _record_batch_times(oc_main) -> list[float]:
    """Keep every value open_clip's ``train_one_epoch`` puts into ``batch_time_m``, its first ``AverageMeter``
    (``batch_time_m = AverageMeter(); data_time_m = AverageMeter()``): the seconds from the end of one step to the
    end of the next, data wait included. Its log lines print their mean over each logging interval."""
    import open_clip_train.train as oc_train

    recorded: list[float] = []
    pending = {"batch_meter": False}

    class RecordingMeter(oc_train.AverageMeter):
        def __init__(self):
            super().__init__()
            self.recording, pending["batch_meter"] = pending["batch_meter"], False

        def update(self, val, n=1):
            super().update(val, n)
            if self.recording:
                recorded.append(float(val))

    epoch = oc_main.train_one_epoch

    def train_one_epoch(*args, **kwargs):
        pending["batch_meter"] = True
        return epoch(*args, **kwargs)

    oc_train.AverageMeter = RecordingMeter
    oc_main.train_one_epoch = train_one_epoch
    return recorded


def write_local_dir(model_json: str, out: str) -> None:
    """An open_clip model folder for ``--model local-dir:OUT``: the config, the tokenizer (open_clip reads it from
    the folder itself with ``local-dir:``), and the text tower with random weights in OUT/text."""
    from pathlib import Path

    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    folder = Path(out)
    (folder / "text").mkdir(parents=True, exist_ok=True)
    cfg = json.loads(Path(model_json).read_text())
    text_cfg = cfg["text_cfg"]
    torch.manual_seed(0)
    tower = AutoModel.from_config(AutoConfig.from_pretrained(text_cfg["hf_model_name"]), add_pooling_layer=False)
    tower.save_pretrained(folder / "text")
    AutoTokenizer.from_pretrained(text_cfg["hf_tokenizer_name"]).save_pretrained(folder)
    text_cfg["hf_model_name"] = str((folder / "text").resolve())
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}, indent=2))


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
    p.add_argument("--exact", action="store_true", help="one pass over the shards (default: --dataset-resampled)")
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
        dataset_resampled=not a.exact,
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
        head, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, None)
        if rest is None or len(head) not in (2, 4) or (len(head) == 4 and head[2] != "--step-times"):
            raise SystemExit("usage: _anchor.py train MODEL_JSON [--step-times PATH] -- OPEN_CLIP_TRAIN_ARGS...")
        run_train(head[1], rest, head[3] if len(head) == 4 else None)
    elif argv[:1] == ["local-dir"] and len(argv) == 3:
        write_local_dir(argv[1], argv[2])
    elif argv[:1] == ["data"]:
        run_data(argv[1:])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
