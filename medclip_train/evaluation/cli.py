"""``medclip-eval zeroshot|retrieval|linear-probe|all|suite``: load a model, evaluate, write JSON/CSV, print a table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from medclip_train.evaluation.datasets import open_classification, open_retrieval
from medclip_train.evaluation.errors import EvalInputError
from medclip_train.evaluation.features import Encoder, FeatureCache
from medclip_train.evaluation.linear_probe import evaluate_linear_probe
from medclip_train.evaluation.metrics import BOOTSTRAP_MAX_N, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, scalar_metrics
from medclip_train.evaluation.model_source import load_for_eval
from medclip_train.evaluation.report import (
    format_interval,
    long_rows,
    markdown_table,
    safe_name,
    write_classification_details,
    write_csv,
    write_json,
)
from medclip_train.evaluation.retrieval import evaluate_retrieval
from medclip_train.evaluation.suite import flat_retrieval_metrics, flat_zeroshot_metrics, run_suite
from medclip_train.evaluation.suite_cli import add_suite_parser
from medclip_train.evaluation.zeroshot import evaluate_zeroshot

# Every figure of a zero-shot or retrieval table is printed with its 95% bootstrap interval and its chance level:
# a number without the baseline it must beat (0.5 for a 2-class task) and without its sampling error reads as
# better than it is.
FIGURE_COLUMNS = ["value", "95% CI", "chance"]
ZEROSHOT_METRICS = {
    "top1": "top-1",
    "top5": "top-5",
    "balanced_acc": "balanced acc",
    "macro_f1": "macro F1",
    "auroc": "AUROC",
    "mAP": "mAP",
}
ZEROSHOT_COLUMNS = ["task", "n", "classes", "metric", *FIGURE_COLUMNS]
PER_CLASS_COLUMNS = ["task", "class", "support", "prevalence", "precision", "recall", "f1"]
PER_CLASS_MULTILABEL_COLUMNS = ["task", "class", "support", "prevalence", "ap", "auroc"]
RETRIEVAL_METRICS = {"R@1": "R@1", "R@5": "R@5", "R@10": "R@10", "mean_rank": "mean rank", "median_rank": "median rank"}
RETRIEVAL_COLUMNS = ["split", "direction", "queries", "metric", *FIGURE_COLUMNS]


def make_encoder(args) -> tuple[Encoder, str]:
    loaded = load_for_eval(args.model, args.pretrained, args.device, args.trust_remote_code)
    encoder = Encoder(
        loaded.model,
        loaded.tokenizer,
        loaded.preprocess,
        device=args.device,
        batch_size=args.batch_size,
        workers=args.workers,
        cache=FeatureCache(args.cache_dir) if args.cache_dir else None,
        progress=not args.no_progress,
    )
    return encoder, getattr(loaded, "name", args.model)


# ----------------------------------------------------------------------------------------------------- commands


def run_zeroshot(args) -> int:
    encoder, model_name = make_encoder(args)
    datasets = [open_classification(d, args.prompts, args.label_prefix, args.split) for d in args.data]
    results = {}
    for data in datasets:
        results[data.name] = evaluate_zeroshot(encoder, data, max_samples=args.max_samples, bootstrap=args.bootstrap)
        write_classification_details(args.output, f"zeroshot_{safe_name(data.name)}", results[data.name])
    write_json(Path(args.output) / "zeroshot.json", {"command": "zeroshot", "model": model_name, "tasks": results})
    rows = [
        row
        for task, r in results.items()
        for row in long_rows(scalar_metrics(r), r.get("ci95", {}), r.get("chance", {}), task=task)
    ]
    write_csv(Path(args.output) / "zeroshot.csv", rows)
    print(markdown_table(zeroshot_rows(results), ZEROSHOT_COLUMNS))
    print_per_class_tables(results)
    print(legend(args.bootstrap))
    return 0


def figure(metrics: dict, key: str) -> dict:
    """The table cells of one figure: its value, 95% interval and chance level."""
    return {
        "value": metrics[key],
        "95% CI": format_interval((metrics.get("ci95") or {}).get(key)),
        "chance": (metrics.get("chance") or {}).get(key),
    }


def zeroshot_rows(results: dict[str, dict]) -> list[dict]:
    return [
        {"task": task, "n": r["n"], "classes": r["num_classes"], "metric": label, **figure(r, key)}
        for task, r in results.items()
        for key, label in ZEROSHOT_METRICS.items()
        if key in r
    ]


def print_per_class_tables(results: dict[str, dict]) -> None:
    """Per-class support, prevalence (a random guess's precision) and recall/precision/F1, or AP/AUROC."""
    for multilabel, columns in ((False, PER_CLASS_COLUMNS), (True, PER_CLASS_MULTILABEL_COLUMNS)):
        rows = [
            {"task": task, **row}
            for task, r in results.items()
            if bool(r.get("multilabel")) == multilabel
            for row in r["per_class"]
        ]
        if rows:
            print()
            print(markdown_table(rows, columns))


def legend(bootstrap: int) -> str:
    intervals = (
        f"95% CI: percentile bootstrap over the test samples ({bootstrap} resamples, seed {BOOTSTRAP_SEED}; "
        f"only for up to {BOOTSTRAP_MAX_N} samples)"
        if bootstrap
        else "95% CI: not computed (--bootstrap 0)"
    )
    return (
        "\nchance: the score of a model that ignores its input (top-1: the majority class's share; balanced acc: "
        f"1/C; AUROC: 0.5; R@k: k/N for one caption per image).\n{intervals}."
    )


def run_retrieval(args) -> int:
    encoder, model_name = make_encoder(args)
    result = evaluate_retrieval(
        encoder,
        open_retrieval(args.data, args.split),
        max_samples=args.max_samples,
        chunk_size=args.chunk_size,
        subset=args.subset,
        subset_seed=args.subset_seed,
        min_words=args.min_words,
        bootstrap=args.bootstrap,
    )
    write_json(Path(args.output) / "retrieval.json", {"command": "retrieval", "model": model_name, **result})
    splits = {"full": result["full"], f"subset{args.subset}": result["subset"]}
    splits = {name: metrics for name, metrics in splits.items() if metrics}
    write_csv(
        Path(args.output) / "retrieval.csv",
        [row for name, m in splits.items() for row in long_rows(m, m.get("ci95", {}), m["chance"], split=name)],
    )
    print(markdown_table(retrieval_rows(splits), RETRIEVAL_COLUMNS))
    print(legend(args.bootstrap))
    return 0


def retrieval_rows(splits: dict[str, dict]) -> list[dict]:
    return [
        {
            "split": name,
            "direction": d,
            "queries": m["num_images"] if d == "i2t" else m["num_texts"],
            "metric": label,
            **figure(m, f"{d}_{key}"),
        }
        for name, m in splits.items()
        for d in ("i2t", "t2i")
        for key, label in RETRIEVAL_METRICS.items()
    ]


def run_linear_probe(args) -> int:
    encoder, model_name = make_encoder(args)
    splits = {"train": args.train, "val": args.val, "test": args.test}
    opened = {
        name: open_classification(spec, label_prefix=args.label_prefix, split=args.split or name, with_prompts=False)
        for name, spec in splits.items()
        if spec
    }
    encoded = {
        name: encoder.images(data.source, args.max_samples, desc=f"{name} images") for name, data in opened.items()
    }
    classes = probe_classes(opened, encoded)
    arrays = {name: probe_arrays(opened[name], encoded[name], classes) for name in opened}
    result = evaluate_linear_probe(
        arrays["train"],
        arrays["test"],
        arrays.get("val"),
        classnames=classes,
        k_shot=args.k_shot,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )
    task = opened["test"].name
    write_classification_details(args.output, f"linear_probe_{safe_name(task)}", result)
    write_json(Path(args.output) / "linear_probe.json", {"command": "linear-probe", "model": model_name, task: result})
    columns = ["task", "n_train", "n_val", "n", "C", "top1", "top5", "balanced_acc", "macro_f1", "auroc"]
    extra = {"C": result["C"], "n_train": result["n_train"], "n_val": result["n_val"]}
    write_csv(Path(args.output) / "linear_probe.csv", long_rows({**extra, **scalar_metrics(result)}, task=task))
    print(markdown_table([{"task": task, **result}], columns))
    return 0


def probe_classes(opened: dict, encoded: dict) -> list[str]:
    """One class list for all splits: the folders (must agree), or the sorted union of shard labels."""
    folder_classes = {name: data.classes for name, data in opened.items() if data.classes is not None}
    if folder_classes:
        first = next(iter(folder_classes.values()))
        for name, classes in folder_classes.items():
            if classes != first:
                raise EvalInputError(f"--{name}: classes {classes} differ from the other splits' {first}")
        return list(first)
    return sorted({c for name, data in opened.items() for c in data.targets(encoded[name].metas).classes})


def probe_arrays(data, encoded, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    labelled = data.targets(encoded.metas, classes)
    if labelled.multilabel:
        raise EvalInputError(f"{data.name}: the linear probe supports single-label data only")
    return encoded.features[torch.as_tensor(labelled.indices)].numpy(), labelled.targets


def run_all(args) -> int:
    tasks, shards = all_inputs(args)
    encoder, model_name = make_encoder(args)
    zeroshot, retrieval = run_suite(
        encoder, tasks, shards, max_samples=args.max_samples, chunk_size=args.chunk_size, bootstrap=args.bootstrap
    )
    flat, intervals, chance = {}, {}, {}
    for name, result in zeroshot.items():
        write_classification_details(args.output, f"zeroshot_{safe_name(name)}", result)
        flat.update(flat_zeroshot_metrics(name, result))
        intervals.update({f"zeroshot/{name}/{k}": v for k, v in result.get("ci95", {}).items()})
        chance.update({f"zeroshot/{name}/{k}": v for k, v in result["chance"].items()})
    if retrieval is not None:
        flat.update(flat_retrieval_metrics(retrieval["full"]))
        intervals.update({f"retrieval/{k}": v for k, v in retrieval["full"].get("ci95", {}).items()})
        chance.update({f"retrieval/{k}": v for k, v in retrieval["full"]["chance"].items()})
    samples_per_s = merge_into_summary(args.summary, flat) if args.summary else None
    results = {"command": "all", "model": model_name, "metrics": flat, "zeroshot": zeroshot, "retrieval": retrieval}
    write_json(Path(args.output) / "results.json", results)
    write_csv(Path(args.output) / "results.csv", long_rows(flat, intervals, chance))
    print(markdown_table(all_table_rows(zeroshot, retrieval, samples_per_s), ["metric", *FIGURE_COLUMNS]))
    print_per_class_tables(zeroshot)
    print(legend(args.bootstrap))
    return 0


def all_inputs(args) -> tuple[list[str], str | None]:
    """Zero-shot task folders and the retrieval shard pattern, from ``--demo-data`` or the explicit flags."""
    if args.demo_data:
        root = Path(args.demo_data)
        if not root.is_dir():
            raise EvalInputError(f"--demo-data {root}: folder not found")
        tasks = sorted(str(p) for p in (root / "zeroshot").glob("*") if p.is_dir())
        shards = str(root / "test-*.tar") if any(root.glob("test-*.tar")) else None
        if not tasks and not shards:
            raise EvalInputError(f"--demo-data {root}: neither zeroshot/<task>/ folders nor test-*.tar shards")
        return tasks, shards
    if not args.zeroshot_task and not args.retrieval_shards:
        raise EvalInputError("all: give --demo-data DIR, or --zeroshot-task DIR (repeatable) / --retrieval-shards")
    return list(args.zeroshot_task or []), args.retrieval_shards


def merge_into_summary(path: str, metrics: dict[str, float]) -> float | None:
    """Write ``metrics`` under ``"eval"`` of the training summary JSON; return its ``steady_samples_per_s``."""
    path = Path(path)
    summary = {}
    if path.is_file():
        try:
            summary = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise EvalInputError(f"--summary {path}: not valid JSON ({err})") from err
    summary["eval"] = metrics
    write_json(path, summary)
    return summary.get("steady_samples_per_s")


def all_table_rows(zeroshot: dict, retrieval: dict | None, samples_per_s: float | None) -> list[dict]:
    rows = []
    for task, result in zeroshot.items():
        for key in ("mAP", "auroc") if result.get("multilabel") else ("top1", "balanced_acc"):
            rows.append({"metric": f"zero-shot {task} {ZEROSHOT_METRICS[key]}", **figure(result, key)})
    if retrieval:
        for direction in ("i2t", "t2i"):
            for k in (1, 5, 10):
                key = f"{direction}_R@{k}"
                rows.append({"metric": f"retrieval {direction} R@{k}", **figure(retrieval["full"], key)})
    if samples_per_s is not None:
        rows.append({"metric": "training samples/s", "value": float(samples_per_s)})
    return rows


# ------------------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="*.ckpt, local-dir:DIR, hf-hub:org/repo or an open_clip name")
    common.add_argument("--pretrained", help="open_clip pretrained tag, for open_clip built-in model names")
    common.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let Hugging Face run Python code shipped with the text tower or tokenizer (off; no checkpoint or "
        "model folder can turn it on)",
    )
    common.add_argument("--output", default="eval_results", help="folder for JSON, CSV and PNG (default: %(default)s)")
    common.add_argument("--batch-size", type=int, default=64)
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--workers", type=int, default=0, help="data loader processes")
    common.add_argument("--cache-dir", help="feature cache: repeated evaluations of a model on data skip encoding")
    common.add_argument("--max-samples", type=int, help="encode at most this many images per dataset")
    common.add_argument("--no-progress", action="store_true", help="no progress bars")

    parser = argparse.ArgumentParser(prog="medclip-eval", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    zs = commands.add_parser("zeroshot", parents=[common], help="zero-shot classification")
    zs.add_argument("--data", action="append", required=True, help="image folder, CLIP_benchmark folder, or shards")
    zs.add_argument("--prompts", help="prompt file (JSON/YAML) or shipped set name (evaluation/prompt_sets/)")
    zs.add_argument("--label-prefix", help="project shards: .json label prefix naming the class (modality:)")
    zs.add_argument("--split", default="test", help="CLIP_benchmark split folder (default: %(default)s)")
    add_bootstrap_argument(zs)
    zs.set_defaults(run=run_zeroshot)

    rt = commands.add_parser("retrieval", parents=[common], help="image-text retrieval")
    rt.add_argument("--data", required=True, help="project shard pattern or CLIP_benchmark retrieval folder")
    rt.add_argument("--split", default="test")
    rt.add_argument("--chunk-size", type=int, help="queries scored at once (default: 128 MiB of scores)")
    rt.add_argument("--subset", type=int, help="also evaluate a deterministic subset of this many pairs (ROCO: 2000)")
    rt.add_argument("--subset-seed", type=int, default=42)
    rt.add_argument("--min-words", type=int, default=3, help="subset: captions of at least this many words")
    add_bootstrap_argument(rt)
    rt.set_defaults(run=run_retrieval)

    lp = commands.add_parser("linear-probe", parents=[common], help="logistic regression on frozen features")
    lp.add_argument("--train", required=True)
    lp.add_argument("--val", help="default: a stratified --val-fraction of --train")
    lp.add_argument("--test", required=True)
    lp.add_argument("--label-prefix")
    lp.add_argument("--split", help="CLIP_benchmark folders: split to read (default: train/val/test per flag)")
    lp.add_argument("--k-shot", type=int, help="k training samples per class")
    lp.add_argument("--val-fraction", type=float, default=0.2)
    lp.add_argument("--seed", type=int, default=0)
    lp.set_defaults(run=run_linear_probe)

    al = commands.add_parser("all", parents=[common], help="zero-shot tasks and retrieval, one table")
    al.add_argument("--demo-data", help="DIR with zeroshot/<task>/ folders and test-*.tar shards")
    al.add_argument("--zeroshot-task", action="append", help="task folder (repeatable), without --demo-data")
    al.add_argument("--retrieval-shards", help="shard pattern, without --demo-data")
    al.add_argument("--chunk-size", type=int)
    al.add_argument("--summary", help="training summary JSON: read steady_samples_per_s, write metrics under 'eval'")
    add_bootstrap_argument(al)
    al.set_defaults(run=run_all)

    add_suite_parser(commands)
    return parser


def add_bootstrap_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=BOOTSTRAP_RESAMPLES,
        metavar="N",
        help=f"resamples of the 95%% percentile bootstrap intervals, computed for test sets of up to "
        f"{BOOTSTRAP_MAX_N} samples (0: none; default: %(default)s)",
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (EvalInputError, FileNotFoundError) as err:
        # Bad input is the user's to fix: one line naming the file or field, no traceback.
        print(f"medclip-eval: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
