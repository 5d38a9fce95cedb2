"""``medclip-eval suite``: several models over a catalog of datasets, one comparison table.

Per model and dataset the images are encoded once (through the feature cache, which later runs reuse), then every
task of the catalog entry runs on those features: zero-shot (with 95% bootstrap intervals), cross-validated
logistic-regression / linear-SVM / kNN probes, and the few-shot linear probe. Output under ``--output``:
``results.csv`` (rows dataset x task x metric, a column per model, the chance level), ``report.md`` (the same as
a markdown table, plus the skipped datasets) and ``results.json`` (everything, per fold).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from tqdm import tqdm

from medclip_train.evaluation.bar_charts import save_task_charts, task_family
from medclip_train.evaluation.catalog import Catalog, CatalogEntry, load_catalog
from medclip_train.evaluation.distributed import (
    close,
    default_workers,
    init_from_env,
    rank,
    rank_device,
    world_size,
)
from medclip_train.evaluation.errors import EvalInputError
from medclip_train.evaluation.feature_maps import analyse_dataset, analyse_modalities, subset_for_map
from medclip_train.evaluation.feature_probes import cross_validated_probes, few_shot_probes, format_mean_std
from medclip_train.evaluation.features import Encoder, FeatureCache
from medclip_train.evaluation.metrics import BOOTSTRAP_MAX_N, BOOTSTRAP_RESAMPLES
from medclip_train.evaluation.overlay import VARIANT_NAMES, overlay_probe, overlay_sources
from medclip_train.evaluation.prompts import default_prompt_set
from medclip_train.evaluation.report import (
    format_interval,
    format_value,
    markdown_table,
    safe_name,
    write_csv,
    write_json,
)
from medclip_train.evaluation.zeroshot import evaluate_zeroshot, zero_shot_classifier

ZEROSHOT_METRICS = ("top1", "balanced_acc", "macro_f1", "auroc")
PROBE_METRICS = ("accuracy", "macro_f1")
FEATURE_METRICS = ("silhouette", "knn_purity")
OVERLAY_METRICS = ("top1_clean", "top1", "top1_drop", "cosine_shift", "flipped", "flipped_to_written")


def model_labels(specs: list[str]) -> list[str]:
    """Short column names: a checkpoint's file stem (``last.ckpt``: its run folder's name, since every run writes
    one), a folder's name, a hub repo's name; repeats get ``#2``."""
    labels = []
    for spec in specs:
        if spec.endswith(".ckpt"):
            path = Path(spec)
            label = path.resolve().parent.name if path.stem == "last" else path.stem
        elif spec.startswith(("local-dir:", "hf-hub:")):
            label = Path(spec.split(":", 1)[1].rstrip("/")).name
        else:
            label = spec
        labels.append(label if label not in labels else f"{label}#{labels.count(label) + 1}")
    return labels


def run_suite(args) -> int:
    from medclip_train.evaluation.model_source import load_for_eval

    try:
        return _run_suite(args, load_for_eval)
    finally:
        close()


def _run_suite(args, load_for_eval) -> int:
    distributed = init_from_env()  # under torchrun: encoding split over the ranks, the rest on rank 0
    main = rank() == 0
    device = rank_device(args.device)
    workers = default_workers() if args.workers is None else args.workers
    catalog = load_catalog(args.catalog)
    present = [e for e in catalog.datasets if e.is_present(args.data_root)]
    skipped = [
        {"dataset": e.name, "path": str(e.location(args.data_root)), "reason": "not found"}
        for e in catalog.datasets
        if e not in present
    ]
    opened = {e.name: open_entry(e, args.data_root) for e in present}  # bad data fails before any model loads
    labels = model_labels(args.models)
    output = Path(args.output)
    cache = FeatureCache(args.cache_dir or output / "feature_cache")
    results: dict[str, dict[str, dict]] = {label: {} for label in labels}
    modality_maps: dict[str, list[str]] = {}
    total = len(labels) * len(present)
    with tqdm(total=total, desc="suite", unit="dataset", disable=args.no_progress or not main) as bar:
        for spec, label in zip(args.models, labels):
            loaded = load_for_eval(spec, args.pretrained, device, args.trust_remote_code)
            encoder = Encoder(
                loaded.model,
                loaded.tokenizer,
                loaded.preprocess,
                device=device,
                batch_size=args.batch_size,
                workers=workers,
                cache=cache,
                bf16=not args.fp32,
                split_over_ranks=distributed,
            )
            for entry in present:  # every rank: its share of every image the tasks need, gathered into the cache
                encode_dataset(encoder, opened[entry.name], entry, args)
            encoder.split_over_ranks = False  # from here rank 0 alone, from the cache: no collectives
            if not main:
                continue
            map_parts = []
            for entry in present:
                bar.set_postfix_str(f"{label} / {entry.name}")
                results[label][entry.name] = evaluate_dataset(
                    encoder, opened[entry.name], entry, catalog, args, label, map_parts
                )
                bar.update()
            if len(map_parts) > 1 and any(p["modality"] for p in map_parts):
                title = f"{label}: image features of {len(map_parts)} datasets"
                plots = analyse_modalities(map_parts, title, f"map_{safe_name(label)}_modality", output / "plots")
                modality_maps[label] = [f"plots/{p}" for p in plots]
            del encoder, loaded
    if not main:
        return 0
    rows = comparison_rows(results, present, labels)
    write_csv(output / "results.csv", csv_rows(rows, labels))
    charts = {
        family: path.relative_to(output).as_posix() for family, path in save_task_charts(rows, labels, output / "plots")
    }
    report = report_markdown(rows, labels, skipped, results, catalog, modality_maps, charts)
    (output / "report.md").write_text(report + "\n")
    write_json(
        output / "results.json",
        {
            "command": "suite",
            "catalog": catalog.path,
            "data_root": str(args.data_root),
            "models": dict(zip(labels, args.models)),
            "ranks": world_size(),
            "settings": vars(catalog.settings),
            "results": results,
            "modality_maps": modality_maps,
            "bar_charts": charts,
            "skipped": skipped,
        },
    )
    print(report)
    return 0


def open_entry(entry: CatalogEntry, data_root):
    try:
        return entry.open(data_root)
    except EvalInputError as err:
        raise EvalInputError(f"catalog dataset {entry.name}: {err}") from err


def suite_prompts(data, classes: list[str]):
    """The prompts zero-shot uses (as ``evaluate_zeroshot`` picks them), in the order of ``classes``."""
    prompts = data.prompts or default_prompt_set(classes, data.name)
    return prompts.subset(classes) if prompts.classes != classes else prompts


def encode_dataset(encoder: Encoder, data, entry: CatalogEntry, args) -> None:
    """Every image encoding the tasks of ``entry`` need, into the cache: the images, and their overlay variants."""
    encoded = encoder.images(data.source, args.max_samples, desc=entry.name)
    if "overlay" not in entry.tasks:
        return
    labelled = data.targets(encoded.metas)
    if labelled.multilabel:
        return
    classnames = suite_prompts(data, labelled.classes).classnames
    for variant, source in overlay_sources(data, encoded, labelled, classnames).items():
        encoder.images(source, args.max_samples, desc=f"{entry.name} overlay {variant}", kind="overlay")


def evaluate_dataset(
    encoder: Encoder, data, entry: CatalogEntry, catalog: Catalog, args, label: str = "", map_parts=None
) -> dict:
    """Every task of ``entry`` on features encoded once (the zero-shot call reads them back from the cache).

    ``map_parts`` collects each dataset's (subset of) features for the model's map coloured by modality.
    """
    settings = catalog.settings
    encoded = encoder.images(data.source, args.max_samples, desc=entry.name)
    labelled = data.targets(encoded.metas)
    out: dict = {"n": int(len(labelled.indices)), "classes": labelled.classes, "modality": entry.modality}
    if "zeroshot" in entry.tasks:
        result = evaluate_zeroshot(encoder, data, max_samples=args.max_samples, bootstrap=args.bootstrap)
        out["zeroshot"] = {k: v for k, v in result.items() if k not in ("prompts",)}
    needs_probe = {"probe_cv", "few_shot", "feature_map", "overlay"} & set(entry.tasks)
    if needs_probe and labelled.multilabel:
        out["probe_note"] = "multi-label data: the probes, feature maps and overlay probe need one class per image"
        return out
    features = encoded.features[torch.as_tensor(labelled.indices)].numpy()
    if "overlay" in entry.tasks:
        prompts = suite_prompts(data, labelled.classes)
        classifier = zero_shot_classifier(encoder.model, encoder.tokenizer, prompts, encoder.device).cpu()
        out["overlay"] = overlay_probe(
            encoder, data, encoded, labelled, classifier, prompts.classnames, args.max_samples
        )
    if "feature_map" in entry.tasks:
        names = class_display_names(data, labelled.classes)
        stem = f"map_{safe_name(label)}_{safe_name(entry.name)}"
        title = f"{label} on {entry.name}" + (f" ({entry.modality})" if entry.modality else "")
        plots = Path(args.output) / "plots"
        out["feature_map"] = analyse_dataset(features, labelled.targets, names, title, stem, plots, settings.seed)
        out["feature_map"]["plots"] = [f"plots/{p}" for p in out["feature_map"]["plots"]]
        if map_parts is not None:
            chosen = subset_for_map(len(features), settings.seed)
            map_parts.append({"dataset": entry.name, "modality": entry.modality, "features": features[chosen]})
    if "probe_cv" in entry.tasks:
        out["probe_cv"] = cross_validated_probes(
            features, labelled.targets, len(labelled.classes), settings.folds, settings.knn_k, settings.seed
        )
    if "few_shot" in entry.tasks:
        names = [c.replace("_", " ") for c in labelled.classes]
        out["few_shot"] = few_shot_probes(
            features, labelled.targets, names, settings.shots, settings.folds, settings.seed
        )
    return out


def class_display_names(data, classes: list[str]) -> list[str]:
    """The prompt set's class names (CLIP_benchmark's ids are "0", "1"), else the class ids."""
    prompts = data.prompts
    if prompts is not None and prompts.classes == classes:
        return list(prompts.classnames)
    return list(classes)


# ---------------------------------------------------------------------------------------------------------- tables


def comparison_rows(results: dict[str, dict[str, dict]], present: list[CatalogEntry], labels: list[str]) -> list:
    """One row per dataset x task x metric: ``cells[label]`` is ``(value, spread)`` per model, and ``chance``."""
    rows = []
    for entry in present:
        per_model = {label: results[label][entry.name] for label in labels}
        first = per_model[labels[0]]
        if "zeroshot" in first:
            for metric in ZEROSHOT_METRICS:
                cells = {}
                for label, r in per_model.items():
                    zs = r["zeroshot"]
                    interval = (zs.get("ci95") or {}).get(metric)
                    cells[label] = {"value": zs.get(metric), "ci95": interval}
                chance = first["zeroshot"]["chance"].get(metric)
                rows.append(_row(entry.name, "zero-shot", metric, chance, cells))
        if "probe_cv" in first and "probes" in first["probe_cv"]:
            cv = first["probe_cv"]
            for probe in cv["probes"]:
                task = f"{probe} ({cv['n_folds']}-fold)" + (f" k={cv['knn_k']}" if probe == "knn" else "")
                for metric in PROBE_METRICS:
                    cells = {label: r["probe_cv"]["probes"][probe][metric] for label, r in per_model.items()}
                    rows.append(_row(entry.name, task, metric, cv["chance"][metric], cells))
        if "feature_map" in first:
            fm = first["feature_map"]
            for metric in FEATURE_METRICS:
                cells = {label: {"value": r["feature_map"][metric]} for label, r in per_model.items()}
                task = f"feature map (cosine, k={fm['knn_purity_k']})"
                rows.append(_row(entry.name, task, metric, fm["chance"][metric], cells))
        if "overlay" in first:
            top1_chance = first["overlay"]["chance"]["top1"]
            for variant, name in VARIANT_NAMES.items():
                for metric in OVERLAY_METRICS:
                    if metric not in first["overlay"][variant]:
                        continue
                    cells = {label: {"value": r["overlay"][variant][metric]} for label, r in per_model.items()}
                    chance = top1_chance if metric.startswith("top1") and metric != "top1_drop" else None
                    rows.append(_row(entry.name, f"text overlay: {name}", metric, chance, cells))
        if "few_shot" in first:
            chance = (first.get("probe_cv") or {}).get("chance") or {}
            for k, shot in first["few_shot"].items():
                for metric in PROBE_METRICS:
                    cells = {label: r["few_shot"][k].get(metric) for label, r in per_model.items()}
                    rows.append(_row(entry.name, f"few-shot {k}/class", metric, chance.get(metric), cells))
    return rows


def _row(dataset: str, task: str, metric: str, chance, cells: dict) -> dict:
    return {"dataset": dataset, "task": task, "metric": metric, "chance": chance, "cells": cells}


def _cell_text(cell: dict | None) -> str:
    if not cell:
        return "-"
    if "mean" in cell:
        return format_mean_std(cell)
    interval = format_interval(cell.get("ci95"))
    return format_value(cell.get("value")) + (f" {interval}" if interval != "-" else "")


def csv_rows(rows: list[dict], labels: list[str]) -> list[dict]:
    """Numbers only: per model its value (the fold mean for probes), and the fold std or the 95% interval."""
    out = []
    for row in rows:
        flat = {k: row[k] for k in ("dataset", "task", "metric", "chance")}
        for label in labels:
            cell = row["cells"].get(label) or {}
            flat[label] = cell.get("mean", cell.get("value"))
        for label in labels:
            cell = row["cells"].get(label) or {}
            low, high = cell.get("ci95") or (None, None)
            flat.update({f"{label} std": cell.get("std"), f"{label} ci_low": low, f"{label} ci_high": high})
        out.append(flat)
    return out


LOWER_IS_BETTER = {"top1_drop", "cosine_shift", "flipped", "flipped_to_written"}
"""Metrics where the robust model scores less (the overlay probe's shifts); every other metric: higher is better."""


def _cell_score(cell: dict | None) -> float | None:
    value = (cell or {}).get("mean", (cell or {}).get("value"))
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _bold_best(row: dict, labels: list[str], texts: dict[str, str]) -> dict[str, str]:
    """The best model's cell in bold (every tied one, as printed); nothing marked with one model or no figure."""
    scores = {label: _cell_score(row["cells"].get(label)) for label in labels}
    scores = {label: round(v, 4) for label, v in scores.items() if v is not None}  # as the table prints them
    if len(labels) < 2 or not scores:
        return texts
    best = (min if row["metric"] in LOWER_IS_BETTER else max)(scores.values())
    return {label: f"**{t}**" if scores.get(label) == best else t for label, t in texts.items()}


def task_tables(rows: list[dict], labels: list[str], charts: dict | None = None) -> list[str]:
    """One markdown section per task (family: ``knn (5-fold) k=20`` and ``k=3`` share one), datasets as rows, models
    as columns, the best figure of each row in bold, the task's bar chart under its table."""
    families: dict[str, list[dict]] = {}
    for row in rows:
        families.setdefault(task_family(row["task"]), []).append(row)
    lines = []
    for family, family_rows in families.items():
        table_rows = [
            {"dataset": r["dataset"], "task": r["task"], "metric": r["metric"], "chance": r["chance"]}
            | _bold_best(r, labels, {label: _cell_text(r["cells"].get(label)) for label in labels})
            for r in family_rows
        ]
        lines += [f"## {family}", "", markdown_table(table_rows, ["dataset", "task", "metric", "chance", *labels])]
        if charts and family in charts:
            lines += ["", f"![{family}]({charts[family]})"]
        lines.append("")
    return lines


def report_markdown(
    rows: list[dict], labels: list[str], skipped: list[dict], results: dict, catalog, modality_maps=None, charts=None
) -> str:
    settings = catalog.settings
    lines = [
        *task_tables(rows, labels, charts),
        "zero-shot: value [95% bootstrap interval] over the test images (for up to "
        f"{BOOTSTRAP_MAX_N} images); probes: mean ± std over stratified folds (seed {settings.seed}); "
        "chance: the score of a model that ignores the image; in bold, the best model of a row (the least shift and "
        "fewest flips for the text overlay). Feature map: cosine silhouette score (chance 0) and kNN "
        "purity, the share of each image's k nearest neighbours with its class (chance: the sum of squared class "
        "shares). Text overlay: the same images with a caption burnt into a corner (another class's name: class "
        "c+1 mod C; or a neutral string), zero-shot top-1 clean and with it, the mean cosine shift 1 - cos(clean, "
        "overlay) of the image features, and the share of predictions flipped (to the written class).",
    ]
    maps = [
        f"- {label} / {dataset}: " + ", ".join(f"[{Path(p).stem}]({p})" for p in r["feature_map"]["plots"])
        for label, per_dataset in results.items()
        for dataset, r in per_dataset.items()
        if "feature_map" in r
    ] + [
        f"- {label} / all datasets: " + ", ".join(f"[{Path(p).stem}]({p})" for p in plots)
        for label, plots in (modality_maps or {}).items()
    ]
    if maps:
        lines += ["", "Feature maps (coloured by class; over all datasets, by modality):", *maps]
    notes = [
        f"- {dataset} / {label}: few-shot {k}/class skipped: {shot['skipped']}"
        for label, per_dataset in results.items()
        for dataset, r in per_dataset.items()
        for k, shot in (r.get("few_shot") or {}).items()
        if "skipped" in shot
    ] + [
        f"- {dataset} / {label}: probes skipped: {r.get('probe_note') or r['probe_cv']['skipped']}"
        for label, per_dataset in results.items()
        for dataset, r in per_dataset.items()
        if r.get("probe_note") or "skipped" in (r.get("probe_cv") or {})
    ]
    if notes:
        lines += ["", "Not computed:", *notes]
    if skipped:
        lines += ["", "Skipped datasets (absent under --data-root):"]
        lines += [f"- {s['dataset']}: {s['reason']}: {s['path']}" for s in skipped]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- parser


def add_suite_parser(commands) -> argparse.ArgumentParser:
    suite = commands.add_parser("suite", help="several models over a catalog of datasets, one comparison table")
    suite.add_argument("--models", nargs="+", required=True, help="*.ckpt, local-dir:DIR, hf-hub:org/repo, open_clip")
    suite.add_argument("--catalog", required=True, help="catalog YAML, or a shipped one: medical")
    suite.add_argument("--data-root", required=True, help="folder the catalog's relative dataset paths start from")
    suite.add_argument("--output", default="eval_suite", help="folder for results.csv/json, report.md")
    suite.add_argument("--pretrained", help="open_clip pretrained tag, for open_clip built-in model names")
    suite.add_argument("--trust-remote-code", action="store_true", help="as for the other commands (off)")
    suite.add_argument("--batch-size", type=int, default=64)
    suite.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    suite.add_argument(
        "--workers", type=int, help="loader processes per rank (default: the available cores, shared among the ranks)"
    )
    suite.add_argument("--fp32", action="store_true", help="CUDA: encode in float32 (default: bf16 autocast)")
    suite.add_argument("--cache-dir", help="feature cache (default: OUTPUT/feature_cache); reused across runs")
    suite.add_argument("--max-samples", type=int, help="encode at most this many images per dataset")
    suite.add_argument("--no-progress", action="store_true", help="no progress bar")
    suite.add_argument(
        "--bootstrap",
        type=int,
        default=BOOTSTRAP_RESAMPLES,
        metavar="N",
        help="zero-shot: resamples of the 95%% bootstrap intervals (0: none; default: %(default)s)",
    )
    suite.set_defaults(run=run_suite)
    return suite
