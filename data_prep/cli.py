"""``medclip-prep``: convert dataset releases to WebDataset shards, generate the demo set, inspect outputs.

Every converter prints ``written=N rejected=M read=R`` on success. Bad input (missing folder, no captions file,
missing columns) is one ``medclip-prep: error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from data_prep import demo, generic, medicat, medmnist, pmc_oa, roco, rocov2, tokenizer
from data_prep.inspection import format_report, inspect_output
from data_prep.records import PrepError
from data_prep.writer import Summary, WriteOptions, write_dataset

# The demo's own defaults: smaller shards than for real data so the demo's loaders get several shards; up to 4
# processes. Every other converter takes WriteOptions' defaults. Both reach --help and the manifest from here only.
DEMO_DEFAULTS = WriteOptions(samples_per_shard=500, jpeg_quality=90, workers=min(4, os.cpu_count() or 1))


# The value of a bare --tokenizer: an object, not a path, so that no folder a user names can be taken for it.
_TOKENIZER_IN_OUTPUT = object()


def _common_parser(defaults: WriteOptions) -> argparse.ArgumentParser:
    """The shared output options, with ``defaults`` as their defaults and in their help text.

    A fresh parser per subcommand: argparse ``parents`` share their Action objects, so one subcommand's
    ``set_defaults`` would change every other subcommand's defaults (the demo's 500 samples per shard leaked into
    every converter's manifest while ``--help`` said 5000).
    """
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("output options (every converter)")
    g.add_argument("--output", "-o", type=Path, required=True, help="output folder for shards and manifest")
    g.add_argument(
        "--samples-per-shard",
        type=int,
        default=defaults.samples_per_shard,
        help="samples per tar shard (default %(default)s)",
    )
    g.add_argument(
        "--max-image-side",
        type=int,
        default=defaults.max_image_side,
        help="resize so the longest side fits; never upscales (default: keep sizes)",
    )
    g.add_argument(
        "--jpeg-quality",
        type=int,
        default=defaults.jpeg_quality,
        help="quality of re-encoded JPEGs (default %(default)s)",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=defaults.workers,
        help="image decode/encode processes; output order is unchanged (default %(default)s)",
    )
    g.add_argument("--dedupe", action="store_true", help="reject images whose pixels equal an earlier sample's")
    g.add_argument(
        "--min-caption-words",
        type=int,
        default=defaults.min_caption_words,
        help="reject captions with fewer words (default %(default)s)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed for shuffling, hashed splits and templates (default %(default)s)",
    )
    g.add_argument("--shuffle", action="store_true", help="shuffle records before writing (deterministic by seed)")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier conversion in --output")
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    g.add_argument(
        "--tokenizer",
        nargs="?",
        const=_TOKENIZER_IN_OUTPUT,  # --tokenizer without DIR
        default=None,
        type=Path,
        metavar="DIR",
        help="also build a WordPiece tokenizer of the written train captions into DIR (default DIR: OUT/tokenizer)",
    )
    g.add_argument(
        "--vocab-size",
        type=int,
        default=defaults.vocab_size,
        help="largest vocabulary of --tokenizer (default %(default)s)",
    )
    return common


def _add_input(p: argparse.ArgumentParser, help: str) -> None:
    """The input, as a positional argument or as ``--input`` (both spellings are in use)."""
    p.add_argument("input", type=Path, nargs="?", help=help)
    p.add_argument(
        "--input", "-i", type=Path, dest="input_option", metavar="INPUT", help="same as the positional input"
    )


def _add_table_input(p: argparse.ArgumentParser, kind: str) -> None:
    """One table, or one per split as releases publish them (``--input train=a.jsonl --input test=b.jsonl``)."""
    p.add_argument("input", nargs="?", metavar="INPUT", help=f"the {kind} file")
    p.add_argument(
        "--input",
        "-i",
        action="append",
        default=[],
        dest="table_inputs",
        metavar="[SPLIT=]FILE",
        help=f"a {kind} file; SPLIT=FILE puts all its rows in SPLIT (train/val/test); repeatable",
    )


def _add_fractions(p: argparse.ArgumentParser) -> None:
    p.add_argument("--val-fraction", type=float, default=0.0, help="share hashed into val when there is no split")
    p.add_argument("--test-fraction", type=float, default=0.0, help="share hashed into test when there is no split")


def _add_source_info(p: argparse.ArgumentParser, default_source: str) -> None:
    p.add_argument("--source", default=default_source, help=f"source name in each sample's .json ({default_source})")
    p.add_argument("--modality", default=None, help="modality of every sample")
    p.add_argument("--licence", default=None, help="licence of every sample")
    _add_fractions(p)


def _add_table_columns(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-column", required=True, help="column/field with the image path (relative to --images)")
    p.add_argument("--caption-column", required=True, help="column/field with the caption")
    p.add_argument("--id-column", default=None, help="column/field with the record id (default: the image path)")
    p.add_argument("--split-column", default=None, help="column/field with train/val/test")
    p.add_argument("--labels-column", default=None, help="column/field with class labels")
    p.add_argument("--modality-column", default=None, help="column/field with the modality")
    p.add_argument("--label-separator", default=";", help="separator of several labels in one cell (default ;)")
    p.add_argument("--images", type=Path, default=None, help="image folder, .zip or .tar (default: the table's folder)")
    _add_source_info(p, "")


def build_parser() -> argparse.ArgumentParser:
    """The ``medclip-prep`` argument parser."""
    description = "Convert dataset releases to WebDataset shards, generate the demo set, inspect outputs."
    parser = argparse.ArgumentParser(prog="medclip-prep", description=description)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    def common(defaults: WriteOptions | None = None) -> list[argparse.ArgumentParser]:
        return [_common_parser(defaults or WriteOptions())]

    p = sub.add_parser("roco", parents=common(), help="ROCO v1 (GitHub data/ folder or Kaggle CSVs)")
    _add_input(p, "repository root, its data/ folder, or Kaggle all_data/")
    p.add_argument("--images-subdir", default="images", help="image folder inside each <split>/<class>/")
    p.set_defaults(run=_run_roco)

    p = sub.add_parser("rocov2", parents=common(), help="ROCOv2 ({split}_captions.csv, concepts, images)")
    _add_input(p, "folder with {train,valid,test}_captions.csv")
    p.add_argument("--images", type=Path, default=None, help="folder holding {train,valid,test}/ (default: input)")
    p.set_defaults(run=_run_rocov2)

    p = sub.add_parser("medicat", parents=common(), help="MedICaT jsonl + figures/")
    _add_input(p, "release folder or the jsonl file")
    p.add_argument("--figures", type=Path, default=None, help="figures folder (default: figures/ next to the jsonl)")
    _add_fractions(p)
    p.set_defaults(run=_run_medicat)

    p = sub.add_parser("pmc-oa", parents=common(), help="PMC-OA jsonl + image folder")
    _add_input(p, "release folder or one jsonl file")
    p.add_argument(
        "--images", type=Path, default=None, help="image folder, .zip or .tar (default: found next to the jsonl)"
    )
    _add_fractions(p)
    p.set_defaults(run=_run_pmc_oa)

    p = sub.add_parser("csv", parents=common(), help="generic CSV table of image paths and captions")
    _add_table_input(p, "CSV")
    p.add_argument("--delimiter", default=",", help="field delimiter (default ,)")
    _add_table_columns(p)
    p.set_defaults(run=_run_table, reader="csv")

    p = sub.add_parser("jsonl", parents=common(), help="generic JSONL table of image paths and captions")
    _add_table_input(p, "JSONL")
    _add_table_columns(p)
    p.set_defaults(run=_run_table, reader="jsonl")

    p = sub.add_parser("imagefolder", parents=common(), help="root/<class>/* images with caption templates")
    _add_input(p, "root folder (root/<class>/* or root/<split>/<class>/*)")
    p.add_argument("--template", action="append", default=None, help="caption template with {c}; repeatable")
    p.add_argument("--class-name", action="append", default=[], metavar="FOLDER=NAME", help="display name; repeatable")
    _add_source_info(p, "imagefolder")
    p.set_defaults(run=_run_imagefolder)

    p = sub.add_parser("medmnist", parents=common(), help="MedMNIST v2 .npz (+ zero-shot folder of the test split)")
    _add_input(p, "the .npz file (breastmnist.npz, pathmnist_224.npz, ...)")
    p.add_argument("--subset", default=None, help="subset name when the file name does not say it")
    p.add_argument("--no-zeroshot", action="store_true", help="do not export OUT/zeroshot/<subset>/")
    p.set_defaults(run=_run_medmnist)

    p = sub.add_parser("demo", parents=common(DEMO_DEFAULTS), help="generate the procedural demo dataset")
    p.add_argument("--image-size", type=int, default=160, help="image side in pixels (default 160)")
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-val", type=int, default=200)
    p.add_argument("--n-test", type=int, default=400)
    p.set_defaults(run=_run_demo)

    p = sub.add_parser("tokenizer", help="build a WordPiece tokenizer from the captions of shards")
    p.add_argument(
        "--input",
        "-i",
        action="append",
        required=True,
        metavar="SHARDS",
        help="shard files, glob or brace pattern ('shards/train-*.tar'); repeatable. Use the train split only",
    )
    p.add_argument("--output", "-o", type=Path, required=True, help="folder for the tokenizer files")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=tokenizer.DEFAULT_VOCAB_SIZE,
        help="largest vocabulary, special tokens and characters included (default %(default)s: the tiny preset's)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a tokenizer already in --output")
    p.add_argument("--quiet", "-q", action="store_true", help="accepted as by the converters (no progress bar here)")
    p.set_defaults(run=_run_tokenizer)

    p = sub.add_parser("inspect", help="describe a converted folder")
    p.add_argument("output", type=Path, help="the converter's output folder")
    p.add_argument("--tokenizer", default=None, help="Hugging Face tokenizer for caption lengths (default whitespace)")
    p.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="the model's text context (special tokens included): report the share of captions it truncates",
    )
    p.add_argument("--max-samples", type=int, default=None, help="read at most this many samples per shard")
    p.set_defaults(run=_run_inspect)
    return parser


def _options(args: argparse.Namespace) -> WriteOptions:
    return WriteOptions(
        samples_per_shard=args.samples_per_shard,
        max_image_side=args.max_image_side,
        jpeg_quality=args.jpeg_quality,
        workers=args.workers,
        dedupe=args.dedupe,
        min_caption_words=args.min_caption_words,
        seed=args.seed,
        shuffle=args.shuffle,
        overwrite=args.overwrite,
        quiet=args.quiet,
        tokenizer=_tokenizer_dir(args),
        vocab_size=args.vocab_size,
    )


def _tokenizer_dir(args: argparse.Namespace) -> Path | None:
    """Where ``--tokenizer`` saves. An earlier tokenizer elsewhere than OUT/tokenizer is refused here, before any
    work, unless ``--overwrite``; OUT/tokenizer belongs to the earlier conversion, which the writer refuses or
    replaces as a whole."""
    if args.tokenizer is None:
        return None
    default = args.output / "tokenizer"
    if args.tokenizer is _TOKENIZER_IN_OUTPUT:
        return default
    if args.tokenizer.resolve() != default.resolve():
        tokenizer.check_output(args.tokenizer, args.overwrite, "--tokenizer")
    return args.tokenizer


def _run_roco(args) -> Summary:
    records = roco.read_records(args.input, args.images_subdir)
    options = {"input": str(args.input), "images_subdir": args.images_subdir}
    return write_dataset(records, args.output, _options(args), "roco", options)


def _run_rocov2(args) -> Summary:
    records = rocov2.read_records(args.input, args.images)
    options = {"input": str(args.input), "images": _str(args.images)}
    return write_dataset(records, args.output, _options(args), "rocov2", options)


def _run_medicat(args) -> Summary:
    records = medicat.read_records(args.input, args.figures, args.val_fraction, args.test_fraction, args.seed)
    options = {"input": str(args.input), "figures": _str(args.figures), **_fractions(args)}
    return write_dataset(records, args.output, _options(args), "medicat", options)


def _run_pmc_oa(args) -> Summary:
    records = pmc_oa.read_records(args.input, args.images, args.val_fraction, args.test_fraction, args.seed)
    options = {"input": str(args.input), "images": _str(args.images), **_fractions(args)}
    return write_dataset(records, args.output, _options(args), "pmc-oa", options)


def _run_table(args) -> Summary:
    columns = generic.TableColumns(
        args.image_column, args.caption_column, args.id_column, args.split_column, args.labels_column,
        args.modality_column,
    )  # fmt: skip
    info = _source_info(args, args.source or args.reader)
    given = ([args.input] if args.input else []) + args.table_inputs
    if not given:
        raise PrepError(f"{args.reader}: the input (a positional argument or --input) is required")
    tables = []  # read_csv/read_jsonl check each file and its columns now, before the output folder is touched
    for item in given:
        split, path = _table_input(item, args.split_column)
        if args.reader == "csv":
            delimiter, separator = args.delimiter, args.label_separator
            tables.append(generic.read_csv(path, columns, info, args.images, delimiter, separator, split))
        else:
            tables.append(generic.read_jsonl(path, columns, info, args.images, args.label_separator, split))
    records = itertools.chain.from_iterable(tables)
    options = {"input": given[0] if len(given) == 1 else given, "images": _str(args.images), "columns": vars(columns)}
    return write_dataset(records, args.output, _options(args), args.reader, {**options, **_info(info)})


def _table_input(item: str, split_column: str | None) -> tuple[str | None, Path]:
    """``train=a.jsonl`` -> ``("train", a.jsonl)``; a plain file (even one with ``=`` in its name) -> no split."""
    prefix, sep, rest = item.partition("=")
    split = generic.SPLIT_NAMES.get(prefix.strip().lower()) if sep else None
    if split is None:
        return None, Path(item)
    if split_column:
        raise PrepError(f"--input {item}: a split per file and --split-column {split_column}: give the split one way")
    return split, Path(rest)


def _run_imagefolder(args) -> Summary:
    class_names = dict(_split_pair(item) for item in args.class_name)
    templates = tuple(args.template) if args.template else generic.DEFAULT_TEMPLATES
    info = _source_info(args, args.source)
    records = generic.read_image_folder(args.input, info, templates, class_names)
    options = {"input": str(args.input), "templates": list(templates), "class_names": class_names, **_info(info)}
    return write_dataset(records, args.output, _options(args), "imagefolder", options)


def _run_medmnist(args) -> Summary:
    subset = medmnist.subset_of(args.input, args.subset)
    arrays = medmnist.load_npz(args.input)
    records = medmnist.read_records(args.input, arrays, subset, args.seed)
    total = sum(len(arrays[f"{s}_labels"]) for s in medmnist.SPLITS)

    def finalize(out: Path) -> dict:
        if args.no_zeroshot:
            return {}
        return {"zeroshot": {subset: medmnist.export_zeroshot(arrays, subset, out / "zeroshot" / subset)}}

    options = {"input": str(args.input), "subset": subset, "zeroshot": not args.no_zeroshot}
    return write_dataset(records, args.output, _options(args), "medmnist", options, total, finalize)


def _run_demo(args) -> Summary:
    counts = {"train": args.n_train, "val": args.n_val, "test": args.n_test}
    if min(counts.values()) < 0 or args.image_size < 32:
        raise PrepError("demo: sample counts must be >= 0 and --image-size >= 32")
    return demo.run(args.output, counts, args.image_size, _options(args))


def _run_tokenizer(args) -> int:
    vocab, captions = tokenizer.build_from_shards(args.input, args.output, args.vocab_size, args.overwrite)
    print(f"tokenizer: vocab_size={vocab} captions={captions} -> {args.output}")
    return 0


def _run_inspect(args) -> int:
    if args.context_length is not None and (args.tokenizer is None or args.context_length < 1):
        raise PrepError("--context-length needs --tokenizer (the model's tokens, not words) and a positive length")
    report = inspect_output(args.output, args.tokenizer, args.max_samples, args.context_length)
    print(format_report(report))
    return 0 if report["complete"] else 1


def _source_info(args, name: str) -> generic.SourceInfo:
    for flag, value in (("--val-fraction", args.val_fraction), ("--test-fraction", args.test_fraction)):
        if not 0.0 <= value < 1.0:
            raise PrepError(f"{flag} must be in [0, 1), got {value}")
    return generic.SourceInfo(name, args.modality, args.licence, args.val_fraction, args.test_fraction, args.seed)


def _split_pair(item: str) -> tuple[str, str]:
    folder, sep, name = item.partition("=")
    if not sep or not folder:
        raise PrepError(f"--class-name expects FOLDER=NAME, got {item!r}")
    return folder, name


def _info(info: generic.SourceInfo) -> dict:
    return {"source": info.name, "modality": info.modality, "licence": info.licence, **_fractions(info)}


def _fractions(obj) -> dict:
    return {"val_fraction": obj.val_fraction, "test_fraction": obj.test_fraction}


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _os_error_line(e: OSError, output: Path | None) -> str:
    """One line for an OS error that stopped a run (a full disk gets the folder named: the error names no file)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"no space left on device while writing {output}: its temporary files were removed, complete shards kept "
            "(no manifest.json: free space, then rerun with --overwrite)"
        )
    return str(e) if e.filename else f"{e} (while writing {output})"


def _nothing_written_line(summary: Summary) -> str:
    """Why a conversion wrote no sample: its most frequent rejection reason, or an input without records."""
    if not summary.read:
        return f"nothing written: no records found in the input (see {summary.output / 'manifest.json'})"
    reasons = summary.rejected_by_reason
    top = max(reasons, key=reasons.get)  # ties: the first by name, as the manifest lists reasons
    hint = " (are the images downloaded and --images right?)" if top == "missing_image" else ""
    return (
        f"nothing written: every record rejected, mostly {top} ({reasons[top]} of {summary.read}){hint}; "
        f"see {summary.output / 'rejected.jsonl'}"
    )


class _Terminated(BaseException):
    """SIGTERM as an exception (like KeyboardInterrupt for SIGINT), so the writer's clean-up runs."""


@contextlib.contextmanager
def _sigterm_stops_cleanly():
    """Turn SIGTERM (``kill``, a scheduler's time limit) into :class:`_Terminated` while a conversion runs.

    Left to its default action, SIGTERM ends the process at once: no ``.tmp`` removed, the pool not shut down. The
    handler fires once and then restores the default, so a second SIGTERM still ends a stuck clean-up.
    """

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise _Terminated

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Run ``medclip-prep``; returns the exit code: 0 ok, 1 writing failed or ``inspect`` saw problems, 2 bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "input_option"):
        if args.input is not None and args.input_option is not None and args.input != args.input_option:
            parser.error("give the input once, as a positional argument or as --input")
        args.input = args.input or args.input_option
        if args.input is None:
            parser.error(f"{args.command}: the input (a positional argument or --input) is required")
    run: Callable = args.run
    try:
        with _sigterm_stops_cleanly():
            result = run(args)
    except _Terminated:
        stopped = "stopped by SIGTERM: temporary files removed, complete shards kept, no manifest.json"
        print(f"medclip-prep: error: {stopped} (rerun with --overwrite to start again)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except PrepError as e:
        print(f"medclip-prep: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk, not the input: the writer has removed its temporary files by now
        print(f"medclip-prep: error: {_os_error_line(e, getattr(args, 'output', None))}", file=sys.stderr)
        return 1
    if isinstance(result, Summary):
        print(result.line())
        _warn_no_tokenizer(args)
        if not result.written:  # a failure scripts must see: the next step would train on nothing
            print(f"medclip-prep: error: {_nothing_written_line(result)}", file=sys.stderr)
            return 1
        return 0
    return result


def _warn_no_tokenizer(args: argparse.Namespace) -> None:
    """A converter's ``--tokenizer`` that found no train caption to learn from (e.g. only ``--input test=...``)."""
    if args.tokenizer is None:
        return
    try:
        built = json.loads((args.output / "manifest.json").read_text(encoding="utf-8"))["extras"]["tokenizer"]
    except (OSError, ValueError, KeyError):
        return
    if not built.get("written", True):
        print(f"medclip-prep: warning: --tokenizer: {built.get('why')}, no tokenizer written", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
