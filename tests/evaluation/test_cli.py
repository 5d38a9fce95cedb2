"""``medclip-eval`` end to end on a tiny image folder and shards with a tiny untrained model."""

from __future__ import annotations

import json

import pytest

from medclip_train.evaluation import cli
from tests.evaluation.conftest import write_image_folder, write_project_shards


@pytest.fixture(autouse=True)
def tiny_loader(monkeypatch, tiny_clip):
    """``load_model`` stand-in: every ``--model`` is the tiny model (no checkpoint, no download)."""
    calls = []

    def load(source, pretrained, device, trust_remote_code=False):
        calls.append((source, trust_remote_code))
        return tiny_clip

    monkeypatch.setattr(cli, "load_for_eval", load)
    return calls


def run(args: list[str]) -> int:
    return cli.main(["--no-progress" if a == "NOPROGRESS" else a for a in args])


def test_zeroshot_writes_json_csv_png_and_prints_a_table(image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = run(["zeroshot", "--model", "tiny", "--data", str(image_folder), "--output", str(out), "--batch-size", "5"])
    assert code == 0
    result = json.loads((out / "zeroshot.json").read_text())["tasks"]["colours"]
    assert result["n"] == 12 and 0 <= result["top1"] <= 1 and "balanced_acc" in result and "macro_f1" in result
    assert result["prompts"]["templates"] == ["a photo of {c}.", "a {c} image."]
    assert (out / "zeroshot.csv").read_text().startswith("task,metric,value")
    assert (out / "zeroshot_colours_per_class.csv").exists()
    assert (out / "zeroshot_colours_confusion.png").read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out
    assert "| task |" in table and "| colours |" in table


def test_zeroshot_on_shards_with_a_shipped_prompt_set(project_shards, tmp_path):
    out = tmp_path / "out"
    args = [
        "zeroshot",
        "--model",
        "m",
        "--data",
        project_shards,
        "--label-prefix",
        "modality:",
        "--prompts",
        "modality",
    ]
    assert run([*args, "--output", str(out)]) == 0
    result = json.loads((out / "zeroshot.json").read_text())["tasks"]["modality"]
    assert result["num_classes"] == 9 and result["n"] == 10


def test_retrieval_with_roco_subset(tmp_path, capsys):
    shards = write_project_shards(tmp_path / "shards", n=12)
    out = tmp_path / "out"
    args = ["retrieval", "--model", "m", "--data", shards, "--output", str(out), "--chunk-size", "5"]
    assert run([*args, "--subset", "4", "--min-words", "4"]) == 0
    result = json.loads((out / "retrieval.json").read_text())
    assert result["full"]["num_images"] == 12 and 0 <= result["full"]["i2t_R@1"] <= 1
    assert result["subset"]["num_images"] == 4 and len(result["subset_keys"]) == 4
    assert "| subset4 | t2i |" in capsys.readouterr().out
    assert "split,metric,value" in (out / "retrieval.csv").read_text()


def test_linear_probe(tmp_path, capsys):
    classes = ["brain", "fundus", "lymph"]
    train = write_image_folder(tmp_path / "train", classes, per_class=6, seed=1)
    test = write_image_folder(tmp_path / "test", classes, per_class=3, seed=2)
    out = tmp_path / "out"
    assert run(["linear-probe", "--model", "m", "--train", str(train), "--test", str(test), "--output", str(out)]) == 0
    result = json.loads((out / "linear_probe.json").read_text())["test"]
    assert result["n"] == 9 and result["n_train"] == 18 and result["C"] > 0
    assert (out / "linear_probe_test_confusion.png").exists()
    assert "| test |" in capsys.readouterr().out


def test_all_with_demo_data_merges_into_the_summary(tmp_path, capsys):
    demo = tmp_path / "demo"
    prompts = {"classnames": {"brain": "an MRI of the brain", "lymph": "lymph node tissue"}, "templates": ["{c}"]}
    write_image_folder(demo / "zeroshot" / "organs", ["brain", "lymph"], per_class=3, prompts=prompts)
    write_project_shards(demo, n=8)
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"steady_samples_per_s": 123.4, "steps": 10}))
    out = tmp_path / "out"
    code = run(
        ["all", "--model", "last.ckpt", "--demo-data", str(demo), "--output", str(out), "--summary", str(summary)]
    )
    assert code == 0
    merged = json.loads(summary.read_text())
    assert merged["steps"] == 10 and "zeroshot/organs/top1" in merged["eval"] and "retrieval/t2i_R@10" in merged["eval"]
    printed = capsys.readouterr().out
    assert printed.count("| metric | value |") == 1  # one table
    for row in ("zero-shot organs top-1", "zero-shot organs balanced acc", "retrieval i2t R@5", "training samples/s"):
        assert row in printed
    assert "123.4" in printed
    assert json.loads((out / "results.json").read_text())["metrics"] == merged["eval"]


def test_cache_dir_second_cli_run_does_not_encode(image_folder, tmp_path, tiny_clip, monkeypatch):
    args = ["zeroshot", "--model", "m", "--data", str(image_folder), "--output", str(tmp_path / "o")]
    assert run([*args, "--cache-dir", str(tmp_path / "cache")]) == 0
    calls = []
    monkeypatch.setattr(tiny_clip.model, "encode_image", lambda *a, **k: calls.append(1))
    assert run([*args, "--cache-dir", str(tmp_path / "cache")]) == 0
    assert calls == []


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "folder not found"),
        ("empty_class", "empty class folder"),
        ("no_placeholder", "has no {c} placeholder"),
        ("unknown_class", "class_prompts: unknown class 'zebra'"),
    ],
)
def test_bad_input_exits_2_with_one_clear_message(image_folder, tmp_path, capsys, case, message):
    data = image_folder
    if case == "missing":
        data = tmp_path / "nope"
    elif case == "empty_class":
        (image_folder / "purple").mkdir()
    elif case == "no_placeholder":
        (image_folder / "prompts.json").write_text(json.dumps({"templates": ["a photo"]}))
    else:
        prompts = {"templates": ["{c}"], "class_prompts": {"zebra": ["a zebra"]}}
        (image_folder / "prompts.json").write_text(json.dumps(prompts))
    assert run(["zeroshot", "--model", "m", "--data", str(data), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1
    if case in ("no_placeholder", "unknown_class"):
        assert "prompts.json" in err


def test_linear_probe_on_shards_shares_classes_across_splits(tmp_path):
    train = write_project_shards(tmp_path / "d", n=16, split="train", seed=1)
    test = write_project_shards(tmp_path / "d", n=8, split="test", seed=2)
    out = tmp_path / "out"
    args = ["linear-probe", "--model", "m", "--train", train, "--test", test, "--label-prefix", "finding:"]
    assert run([*args, "--output", str(out), "--k-shot", "2"]) == 0
    result = json.loads((out / "linear_probe.json").read_text())["finding"]
    assert [row["class"] for row in result["per_class"]] == ["f0", "f1", "f2"]
    assert result["n_train"] == 6 and result["k_shot"] == 2 and result["n"] == 8


def test_trust_remote_code_is_off_unless_the_flag_is_given(image_folder, tmp_path, tiny_loader):
    args = ["zeroshot", "--model", "m.ckpt", "--data", str(image_folder), "--output", str(tmp_path / "o")]
    assert run(args) == 0 and run([*args, "--trust-remote-code"]) == 0
    assert tiny_loader == [("m.ckpt", False), ("m.ckpt", True)]


def markdown_rows(text: str, header_start: str) -> list[dict]:
    """The rows of the printed markdown table whose header starts with ``header_start``, as dicts of cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    columns = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(columns, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def assert_interval_holds(row: dict) -> None:
    low, high = (float(v) for v in row["95% CI"].strip("[]").split(","))
    assert low <= float(row["value"]) <= high, row


def test_zeroshot_table_shows_chance_interval_and_per_class_rows(image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(["zeroshot", "--model", "m", "--data", str(image_folder), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = {row["metric"]: row for row in markdown_rows(printed, "| task | n |")}
    # 12 images, 4 of each of 3 classes: majority share 4/12, balanced accuracy 1/3, AUROC 0.5
    assert {m: rows[m]["chance"] for m in ("top-1", "balanced acc", "AUROC")} == {
        "top-1": "0.3333",
        "balanced acc": "0.3333",
        "AUROC": "0.5000",
    }
    for row in rows.values():
        assert_interval_holds(row)
    per_class = markdown_rows(printed, "| task | class |")
    assert [(r["class"], r["support"], r["prevalence"]) for r in per_class] == [
        (c, "4", "0.3333") for c in ("blue", "green", "red")
    ]
    assert {"precision", "recall"} <= set(per_class[0])
    csv_lines = (out / "zeroshot.csv").read_text().splitlines()
    assert csv_lines[0] == "task,metric,value,ci_low,ci_high,chance"
    assert any(line.startswith("colours,top1,") and line.endswith(",0.3333333333333333") for line in csv_lines)
    tasks = json.loads((out / "zeroshot.json").read_text())["tasks"]["colours"]
    assert tasks["bootstrap"]["resamples"] == 1000 and len(tasks["ci95"]["top1"]) == 2

    assert run(["zeroshot", "--model", "m", "--data", str(image_folder), "--output", str(out), "--bootstrap", "0"]) == 0
    assert {row["95% CI"] for row in markdown_rows(capsys.readouterr().out, "| task | n |")} == {"-"}


def test_retrieval_table_shows_k_over_n_as_chance(tmp_path, capsys):
    shards = write_project_shards(tmp_path / "shards", n=12)
    args = ["retrieval", "--model", "m", "--data", shards, "--output", str(tmp_path / "out"), "--subset", "4"]
    assert run([*args, "--min-words", "4"]) == 0
    rows = markdown_rows(capsys.readouterr().out, "| split |")
    chance = {(r["split"], r["direction"], r["metric"]): r["chance"] for r in rows}
    for direction in ("i2t", "t2i"):
        # one caption per image: k / N, and (N + 1) / 2 for the mean rank
        assert chance[("full", direction, "R@1")] == "0.0833" and chance[("full", direction, "R@5")] == "0.4167"
        assert chance[("full", direction, "R@10")] == "0.8333" and chance[("full", direction, "mean rank")] == "6.5000"
        assert chance[("subset4", direction, "R@1")] == "0.2500" and chance[("subset4", direction, "R@5")] == "1.0000"
    for row in rows:
        if row["metric"].startswith("R@"):
            assert_interval_holds(row)


def test_all_table_shows_chance_and_intervals(tmp_path, capsys):
    demo = tmp_path / "demo"
    prompts = {"classnames": {"brain": "an MRI of the brain", "lymph": "lymph node tissue"}, "templates": ["{c}"]}
    write_image_folder(demo / "zeroshot" / "organs", ["brain", "lymph"], per_class=3, prompts=prompts)
    write_project_shards(demo, n=8)
    assert run(["all", "--model", "m", "--demo-data", str(demo), "--output", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    rows = {row["metric"]: row for row in markdown_rows(printed, "| metric | value | 95% CI | chance |")}
    assert rows["zero-shot organs top-1"]["chance"] == "0.5000" == rows["zero-shot organs balanced acc"]["chance"]
    assert rows["retrieval t2i R@1"]["chance"] == "0.1250" and rows["retrieval i2t R@5"]["chance"] == "0.6250"
    for row in rows.values():
        assert_interval_holds(row)
    assert [r["class"] for r in markdown_rows(printed, "| task | class |")] == [
        "an MRI of the brain",
        "lymph node tissue",
    ]
    assert (tmp_path / "out" / "results.csv").read_text().startswith("metric,value,ci_low,ci_high,chance")
