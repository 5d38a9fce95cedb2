"""Own data, offline, end to end: a release as published (nested JSONL, one file per split, image ids without
extension, lists of captions) -> shards -> a WordPiece tokenizer of its captions -> caption lengths against the
model's context.

The release is built from real records: ROCOv2 captions (``realdata/rocov2``) with real BreastMNIST pixels as their
images, and the MedICaT sample records with their own figures and inline references as extra captions, laid out like
MedPix 2.0 (``{"image": "MPX1024_synpic40275", "Description": {"Caption": ..., "Modality": ...}}``).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.data_prep.readback import check_accounting

MEDICAT_TEST = 3  # the last MedICaT records form the test file


def medpix_like(image: str, caption, modality: str | None) -> dict:
    description = {"Caption": caption} if modality is None else {"Caption": caption, "Modality": modality}
    return {"image": image, "Type": "figure", "Description": description}


@pytest.fixture
def release(realdata, tmp_path) -> dict:
    """``{"root", "train", "test", "expected"}``: the two JSONL files, their images, and what each record must become.

    ``expected`` maps image id -> ``(split, caption, other captions, source image file)``, read from the fixture files
    directly (csv/json modules), not through the converter.
    """
    root = tmp_path / "release"
    images = root / "images"
    images.mkdir(parents=True)
    expected = {}
    train_rows = []
    pixels = np.load(realdata / "medmnist" / "breastmnist.npz")["train_images"]
    with open(realdata / "rocov2" / "test_captions.csv", encoding="utf-8", newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            Image.fromarray(pixels[i]).save(images / f"{row['ID']}.png")
            train_rows.append(medpix_like(row["ID"], row["Caption"], "radiology"))
            expected[row["ID"]] = ("train", row["Caption"].strip(), [], images / f"{row['ID']}.png")
    medicat = [json.loads(line) for line in (realdata / "medicat" / "sample.jsonl").read_text().splitlines()]
    test_rows = []
    for i, rec in enumerate(medicat):
        stem = f"{rec['pdf_hash']}_{Path(rec['fig_uri']).stem}"
        shutil.copyfile(
            realdata / "medicat" / "figures" / f"{rec['pdf_hash']}_{rec['fig_uri']}", images / f"{stem}.png"
        )
        # As released: s2orc_caption and s2orc_references can be null (a null in the list is skipped).
        captions = [rec["s2_caption"], rec["s2orc_caption"], *(rec["s2orc_references"] or [])]
        others = [c.strip() for c in captions[1:] if c and c.strip() != rec["s2_caption"].strip()]
        others = list(dict.fromkeys(others))
        split = "test" if i >= len(medicat) - MEDICAT_TEST else "train"
        (test_rows if split == "test" else train_rows).append(
            medpix_like(stem, captions, "radiology" if rec["radiology"] else None)
        )
        expected[stem] = (split, rec["s2_caption"].strip(), others, images / f"{stem}.png")
    # Records a real release has too: the caption field missing, an image that is not there, two files for one id.
    train_rows.append({"image": "ROCOv2_2023_test_000001", "Description": {"Modality": "radiology"}})
    train_rows.append(medpix_like("MPX9999_synpic00000", "Axial CT of the abdomen.", "radiology"))
    Image.fromarray(pixels[20]).save(images / "twice.png")
    Image.fromarray(pixels[20]).save(images / "twice.jpg")
    train_rows.append(medpix_like("twice", "Breast ultrasound.", "ultrasound"))
    for name, rows in (("train", train_rows), ("test", test_rows)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"root": root, "train": root / "train.jsonl", "test": root / "test.jsonl", "expected": expected}


def convert(run_cli, release, out, *extra):
    return run_cli(
        "jsonl", "--input", f"train={release['train']}", "--input", f"test={release['test']}",
        "--images", release["root"] / "images", "--image-column", "image",
        "--caption-column", "Description.Caption", "--modality-column", "Description.Modality",
        "--source", "medpix", "-o", out, *extra,
    )  # fmt: skip


def pixels_of(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_nested_jsonl_split_files_extensionless_images_and_caption_lists(release, tmp_path, run_cli):
    out = tmp_path / "shards"
    code, stdout, stderr = convert(run_cli, release, out)
    assert code == 0, stderr
    manifest, samples, rejected = check_accounting(out, stdout)
    expected = release["expected"]
    by_id = {s["json"]["id"]: s for s in samples}
    assert sorted(by_id) == sorted(expected)
    for rid, (split, caption, others, image_file) in expected.items():
        sample = by_id[rid]
        assert sample["json"]["split"] == split and sample["txt"] == caption
        # The training stream draws from [txt, *captions]: the other captions only, each once.
        assert sample["json"].get("captions", []) == others
        assert sample["json"]["image_file"] == image_file.name  # the id resolved to its .png
        assert np.array_equal(pixels_of(sample["image"]), np.asarray(Image.open(image_file).convert("RGB")))
    assert by_id["ROCOv2_2023_test_000001"]["json"]["modality"] == "radiology"
    assert "modality" not in by_id["57c9ad0f4aab133f96d40992c46926fabc901ffa_2-Figure1-1"]["json"]  # not radiology
    assert any(by_id[rid]["json"].get("captions") for rid in expected if expected[rid][0] == "test")
    assert {s: v["written"] for s, v in manifest["splits"].items()} == {"train": 19, "test": 3}
    assert manifest["converter"]["options"]["input"] == [f"train={release['train']}", f"test={release['test']}"]
    reasons = {(r["id"], r["reason"]): r for r in rejected}
    assert sorted(reasons) == [
        ("MPX9999_synpic00000", "missing_image"),
        ("ROCOv2_2023_test_000001", "malformed_record"),
        ("twice", "malformed_record"),
    ]
    assert reasons["ROCOv2_2023_test_000001", "malformed_record"]["detail"] == "no field 'Description.Caption'"
    assert ".png" in reasons["MPX9999_synpic00000", "missing_image"]["detail"]
    assert "twice.jpg, twice.png" in reasons["twice", "malformed_record"]["detail"]
    assert all(r["split"] == "train" and r["source_file"] == str(release["train"]) for r in rejected)


def test_a_bad_table_input_is_one_clear_line(release, tmp_path, run_cli):
    common = ["--images", release["root"] / "images", "--image-column", "image", "-o", tmp_path / "out"]
    code, _, err = run_cli("jsonl", release["train"], *common, "--caption-column", "Description.Text")
    assert code == 2 and err.count("\n") == 1
    assert "no field Description.Text" in err and "Description.Caption" in err and str(release["train"]) in err
    code, _, err = run_cli("jsonl", "--input", f"train={release['train']}", *common, "--caption-column",
                           "Description.Caption", "--split-column", "Description.Split")  # fmt: skip
    assert code == 2 and "--split-column" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def tokenize(folder: Path, text: str) -> list[str]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).tokenize(text)


def test_tokenizer_from_shards_and_from_the_converter(release, tmp_path, run_cli):
    out = tmp_path / "shards"
    code, _, stderr = convert(run_cli, release, out, "--tokenizer")
    assert code == 0, stderr
    first, second = tmp_path / "tok1", tmp_path / "tok2"
    for folder in (first, second):
        code, stdout, stderr = run_cli("tokenizer", "--input", out / "train-*.tar", "--output", folder)
        assert code == 0, stderr
        assert f"-> {folder}" in stdout
    files = sorted(p.name for p in first.iterdir())
    assert "tokenizer.json" in files
    # Deterministic, and the same whether built from the shards or while converting.
    for other in (second, out / "tokenizer"):
        assert sorted(p.name for p in other.iterdir()) == files
        assert all((first / name).read_bytes() == (other / name).read_bytes() for name in files)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["extras"]["tokenizer"]["path"] == "tokenizer" and manifest["extras"]["tokenizer"]["written"]
    # "revealed" is in two ROCOv2 captions: one token. "consolidation" is in none: only character pieces.
    assert tokenize(first, "CT revealed") == ["ct", "revealed"]
    pieces = tokenize(first, "consolidation")
    assert len(pieces) > 1 and "".join(p.removeprefix("##") for p in pieces) == "consolidation"
    # Only the train split shapes the vocabulary: "splenic" is in test-file captions only.
    assert len(tokenize(first, "splenic")) > 1


def test_the_tokenizer_loads_through_the_model_config(release, tmp_path, run_cli):
    from medclip_train.config import ModelConfig
    from medclip_train.model.factory import build_tokenizer, resolve_open_clip_cfg

    out = tmp_path / "shards"
    assert convert(run_cli, release, out)[0] == 0
    folder = tmp_path / "tok"
    assert run_cli("tokenizer", "-i", out / "train-*.tar", "-o", folder, "--vocab-size", "4096")[0] == 0
    model_cfg, _ = resolve_open_clip_cfg(ModelConfig(preset="tiny", tokenizer=str(folder)))
    tokenizer = build_tokenizer(model_cfg)
    ids = tokenizer(["CT revealed an aneurysm."])[0].tolist()
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    context = model_cfg["text_cfg"]["context_length"]
    words = [vocab[w] for w in ("ct", "revealed", "an", "aneurysm", ".")]
    assert ids == [vocab["[CLS]"], *words, vocab["[SEP]"]] + [vocab["[PAD]"]] * (context - 7)
    assert vocab["[PAD]"] == 0 and len(vocab) <= 4096  # the tiny preset's BERT has 4096 embeddings


def test_tokenizer_errors_are_one_clear_line(release, tmp_path, run_cli):
    out = tmp_path / "shards"
    assert convert(run_cli, release, out, "--tokenizer", tmp_path / "tok")[0] == 0
    code, _, err = run_cli("tokenizer", "-i", tmp_path / "nothing-*.tar", "-o", tmp_path / "t")
    assert code == 2 and "nothing-*.tar" in err and err.count("\n") == 1
    code, _, err = run_cli("tokenizer", "-i", out / "train-*.tar", "-o", tmp_path / "tok")
    assert code == 2 and "--overwrite" in err and str(tmp_path / "tok") in err
    code, _, err = run_cli("tokenizer", "-i", out / "train-*.tar", "-o", tmp_path / "t", "--vocab-size", "20")
    assert code == 2 and "--vocab-size 20" in err
    # A converter refuses to replace a tokenizer outside its output before converting anything.
    code, _, err = convert(run_cli, release, tmp_path / "again", "--tokenizer", tmp_path / "tok")
    assert code == 2 and "--tokenizer" in err and not (tmp_path / "again").exists()
    # Only a test file: nothing to learn a vocabulary from, said on stderr; the conversion itself succeeds.
    code, _, err = run_cli("jsonl", "--input", f"test={release['test']}", "--images", release["root"] / "images",
                           "--image-column", "image", "--caption-column", "Description.Caption",
                           "-o", tmp_path / "only_test", "--tokenizer")  # fmt: skip
    assert code == 0 and "no train captions" in err and not (tmp_path / "only_test" / "tokenizer").exists()


def test_inspect_reports_token_lengths_against_the_context(realdata, tmp_path, run_cli):
    # Every word of these captions is in the vocabulary built from them, so a caption's length in tokens is its
    # number of words: 2, 4, 6, 8 and 30.
    captions = [
        "chest radiograph",
        "axial ct of pelvis",
        "mri of the brain with contrast",
        "ct of the chest with contrast shows nodule",
        " ".join(["ct"] * 30),
    ]
    figures = sorted((realdata / "medicat" / "figures").iterdir())
    rows = [{"file": f.name, "text": c} for f, c in zip(figures, captions)]
    table = tmp_path / "t.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out"
    code, _, err = run_cli("jsonl", table, "--images", realdata / "medicat" / "figures", "--image-column", "file",
                           "--caption-column", "text", "-o", out, "--tokenizer")  # fmt: skip
    assert code == 0, err
    code, report, err = run_cli("inspect", out, "--tokenizer", out / "tokenizer", "--context-length", "8")
    assert code == 0, err
    # Linear interpolation between the sorted lengths [2, 4, 6, 8, 30] at rank q/100 * (5 - 1):
    # p50 -> rank 2 -> 6; p90 -> rank 3.6 -> 8 + 0.6 * 22 = 21.2; p95 -> 25.6; p99 -> 29.12.
    # A context of 8 holds [CLS] + 6 tokens + [SEP]: the captions of 8 and 30 tokens are cut, 2 of 5.
    line = next(x for x in report.splitlines() if x.strip().startswith("train:") and "p50" in x)
    assert "p50=6  p90=21.2  p95=25.6  p99=29.12  max=30" in line
    assert "longer than context 8: 40.0% (2)" in line
    from data_prep.inspection import inspect_output

    stats = inspect_output(out, str(out / "tokenizer"), context_length=10)["caption_tokens"]["train"]
    assert (stats["truncated"], stats["truncated_fraction"], stats["p50"], stats["max"]) == (1, 0.2, 6.0, 30)
    code, _, err = run_cli("inspect", out, "--context-length", "8")
    assert code == 2 and "--context-length needs --tokenizer" in err
