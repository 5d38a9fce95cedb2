"""Generic CSV/JSONL tables and image folders, and every bad-input reason end to end."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.data_prep.conftest import jpeg_bytes, png_bytes
from tests.data_prep.readback import check_accounting
from tests.data_prep.test_images import png_with_header


def cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (30, 160, 60)).convert("CMYK").save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def messy_images(tmp_path):
    """An image folder with one file of every awkward kind."""
    root = tmp_path / "images"
    root.mkdir()
    good = jpeg_bytes(size=(64, 64))
    grey16 = Image.fromarray(np.linspace(100, 4000, 32 * 32).reshape(32, 32).astype(np.uint16))
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    files = {
        "good.jpg": good,
        "copy_of_good.jpg": good,
        "grey16.png": png_bytes(grey16),
        "cmyk.jpg": cmyk_jpeg(),
        "palette.png": png_bytes(Image.new("RGB", (16, 16), (200, 10, 10)).convert("P")),
        "rgba.png": png_bytes(rgba),
        "truncated.jpg": jpeg_bytes(size=(128, 128))[:900],
        "garbage.jpg": b"\x00\x01garbage" * 50,
        "bomb.png": png_with_header(100_000, 100_000),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


TABLE = [
    ("r01", "good.jpg", "A good radiograph of the chest."),
    ("r02", "copy_of_good.jpg", "The same pixels under another name."),
    ("r03", "grey16.png", "Sixteen-bit grey CT slice."),
    ("r04", "cmyk.jpg", "CMYK photograph of a specimen."),
    ("r05", "palette.png", "Palette diagram."),
    ("r06", "rgba.png", "Transparent figure."),
    ("r07", "truncated.jpg", "Half a JPEG."),
    ("r08", "garbage.jpg", "Not an image."),
    ("r09", "bomb.png", "A decompression bomb."),
    ("r10", "missing.jpg", "No such file."),
    ("r11", "good.jpg", "   "),
    ("r12", "../outside.jpg", "Escapes the image folder."),
    ("r13", "/etc/hostname", "Absolute path."),
    ("r01", "good.jpg", "Same id again."),
    ("r14", "good.jpg", "Short"),
]
EXPECTED = {
    "r02": "duplicate_image",
    "r07": "truncated_image",
    "r08": "unreadable_image",
    "r09": "decompression_bomb",
    "r10": "missing_image",
    "r11": "empty_caption",
    "r12": "path_escape",
    "r13": "path_escape",
    "r15": "undecodable_text",
    "r14": "caption_too_short",
}


def test_csv_every_bad_input_has_a_reason(messy_images, tmp_path, run_cli):
    table = tmp_path / "table.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["uid", "path", "text", "labels"])
        writer.writerows([(uid, path, text, "a;b") for uid, path, text in TABLE])
    with open(table, "ab") as f:
        f.write(b"r15,good.jpg,caf\xe9 latin-1,\n")
    args = ["--image-column", "path", "--caption-column", "text", "--id-column", "uid", "--labels-column", "labels"]
    code, out, _ = run_cli("csv", table, "-o", tmp_path / "out", "--images", messy_images, *args,
                           "--dedupe", "--min-caption-words", "2", "--modality", "mixed", "--workers", "2")  # fmt: skip
    assert code == 0
    manifest, samples, rejected = check_accounting(tmp_path / "out", out)
    reasons = [(r["id"], r["reason"]) for r in rejected]
    assert ("r01", "duplicate_id") in reasons
    assert {k: v for k, v in reasons if k != "r01"} == EXPECTED
    assert all(r["source_file"] == str(table) for r in rejected)
    by_id = {s["json"]["id"]: s for s in samples}
    assert sorted(by_id) == ["r01", "r03", "r04", "r05", "r06"]
    modes = {rid: Image.open(io.BytesIO(s["image"])).mode for rid, s in by_id.items()}
    assert modes == {"r01": "RGB", "r03": "L", "r04": "RGB", "r05": "RGB", "r06": "RGB"}
    grey = np.asarray(Image.open(io.BytesIO(by_id["r03"]["image"])))
    assert grey.min() <= 3 and grey.max() >= 252  # windowed by the real 100..4000 range
    assert by_id["r01"]["json"]["labels"] == ["a", "b"] and by_id["r01"]["json"]["modality"] == "mixed"
    assert by_id["r01"]["json"]["source"] == "csv"
    assert manifest["label_counts"]["train"] == {"a": 5, "b": 5}


def test_jsonl_table_with_splits(messy_images, tmp_path, run_cli):
    rows = [
        {"file": "good.jpg", "caption": "Chest x-ray.", "split": "train", "labels": ["modality:xray"]},
        {"file": "cmyk.jpg", "caption": "Gross specimen.", "split": "validation"},
        {"file": "palette.png", "caption": "lone \ud800 surrogate", "split": "test"},
        {"file": "rgba.png", "caption": "Figure.", "split": "holdout"},
    ]
    path = tmp_path / "table.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "[1, 2]\n\n", encoding="utf-8")
    code, out, _ = run_cli("jsonl", path, "-o", tmp_path / "out", "--images", messy_images, "--image-column", "file",
                           "--caption-column", "caption", "--split-column", "split", "--labels-column", "labels",
                           "--source", "mydata")  # fmt: skip
    assert code == 0
    manifest, samples, rejected = check_accounting(tmp_path / "out", out)
    assert sorted(r["reason"] for r in rejected) == ["malformed_record", "malformed_record", "undecodable_text"]
    assert {s["json"]["id"]: s["json"]["split"] for s in samples} == {"good.jpg": "train", "cmyk.jpg": "val"}
    assert samples[0]["json"]["source"] == "mydata" and manifest["sources"]["mydata"]["read"] == 5


def test_table_with_wrong_column_is_a_clear_error(tmp_path, run_cli):
    table = tmp_path / "t.csv"
    table.write_text("path,caption\na.jpg,A caption.\n", encoding="utf-8")
    code, _, err = run_cli(
        "csv", table, "-o", tmp_path / "out", "--image-column", "image", "--caption-column", "caption"
    )
    assert code == 2 and "missing column(s) image" in err and str(table) in err
    assert not (tmp_path / "out").exists()


def test_imagefolder_with_templates(tmp_path, run_cli):
    root = tmp_path / "folder"
    for cls, n in (("benign_nevus", 3), ("melanoma", 2)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            (root / cls / f"img{i}.png").write_bytes(png_bytes(Image.new("RGB", (20, 20), (i * 40, 90, 20))))
    (root / "melanoma" / "notes.txt").write_text("not an image")
    (root / "README.md").write_text("no class")
    code, out, _ = run_cli("imagefolder", root, "-o", tmp_path / "out", "--source", "derm", "--modality",
                           "dermatoscopy", "--template", "Dermatoscopic image of {label}.", "--class-name",
                           "benign_nevus=a benign nevus")  # fmt: skip
    assert code == 0
    manifest, samples, rejected = check_accounting(tmp_path / "out", out)
    assert sorted(r["id"] for r in rejected) == ["README.md", "melanoma/notes.txt"]
    assert {r["reason"] for r in rejected} == {"unsupported_file"}
    captions = {s["json"]["id"]: s["txt"] for s in samples}
    assert captions["benign_nevus/img0.png"] == "Dermatoscopic image of a benign nevus."
    assert captions["melanoma/img1.png"] == "Dermatoscopic image of melanoma."
    assert manifest["label_counts"]["train"] == {"derm:benign_nevus": 3, "derm:melanoma": 2}
    assert {s["image_ext"] for s in samples} == {"png"}  # 8-bit RGB PNGs are kept as they are


def test_imagefolder_split_layout(tmp_path, run_cli):
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        (tmp_path / "f" / split / "cls").mkdir(parents=True)
        for i in range(n):
            (tmp_path / "f" / split / "cls" / f"{i}.jpg").write_bytes(jpeg_bytes(size=(8, 8), seed=i))
    code, out, _ = run_cli("imagefolder", tmp_path / "f", "-o", tmp_path / "out")
    assert code == 0
    manifest, _, _ = check_accounting(tmp_path / "out", out)
    assert {s: v["written"] for s, v in manifest["splits"].items()} == {"train": 3, "val": 1, "test": 2}
