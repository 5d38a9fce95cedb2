"""Prompt files: every shipped set loads; malformed files fail naming the file and field."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from medclip_train.evaluation.errors import EvalInputError
from medclip_train.evaluation.prompts import PLACEHOLDER, PROMPTS_DIR, load_prompt_set, shipped_prompt_sets

EXPECTED_SETS = {
    "pcam", "lc25000_lung", "lc25000_colon", "rsna_pneumonia", "chexpert_5x200", "modality",
    "medmnist_pathmnist", "medmnist_chestmnist", "medmnist_dermamnist", "medmnist_octmnist",
    "medmnist_pneumoniamnist", "medmnist_breastmnist", "medmnist_bloodmnist", "medmnist_organamnist",
}  # fmt: skip


@pytest.mark.parametrize("name", shipped_prompt_sets())
def test_every_shipped_prompt_set_loads(name):
    prompts = load_prompt_set(name)
    raw = yaml.safe_load((PROMPTS_DIR / f"{name}.yaml").read_text())
    assert prompts.name == raw["name"] and prompts.source.strip()
    assert len(prompts.classes) >= 2 and len(set(prompts.classes)) == len(prompts.classes)
    assert all(PLACEHOLDER in t for t in prompts.templates)
    for index in range(len(prompts.classes)):
        texts = prompts.prompts_for(index)
        assert texts and all(PLACEHOLDER not in t and prompts.classnames[index] in t for t in texts)


def test_the_benchmarks_of_the_issue_are_shipped():
    assert EXPECTED_SETS <= set(shipped_prompt_sets())


def test_medmnist_keys_are_the_class_folders_names_follow_them():
    prompts = load_prompt_set("medmnist_organamnist")
    # keys are medclip-prep's class folders; the class order is by sorted folder name, names follow the keys
    assert prompts.classes[:3] == ["bladder", "femur_left", "femur_right"]
    assert prompts.classnames[prompts.classes.index("spleen")] == "spleen"
    folders = ["cancer_associated_stroma", "colorectal_adenocarcinoma_epithelium"]
    assert load_prompt_set("medmnist_pathmnist").subset(folders).classnames == [
        "cancer-associated stroma",
        "colorectal adenocarcinoma epithelium",
    ]


def write(tmp_path, data, suffix=".json"):
    path = tmp_path / f"prompts{suffix}"
    path.write_text(json.dumps(data) if suffix == ".json" else yaml.safe_dump(data))
    return path


def test_json_and_yaml_and_list_classnames(tmp_path):
    data = {"classnames": {"b": "bee", "a": "ant"}, "templates": ["a photo of {c}."]}
    from_json = load_prompt_set(write(tmp_path, data), ["a", "b"])
    from_yaml = load_prompt_set(write(tmp_path, data, ".yaml"), ["a", "b"])
    assert from_json == from_yaml
    assert from_json.prompts_for(1) == ["a photo of bee."]
    listed = load_prompt_set(write(tmp_path, {"classnames": ["ant", "bee"], "templates": ["{c}"]}), ["a", "b"])
    assert listed.classnames == ["ant", "bee"]


def test_class_prompts_override_templates(tmp_path):
    data = {"classnames": ["ant", "bee"], "templates": ["a {c}"], "class_prompts": {"b": ["a honey bee", "bees"]}}
    prompts = load_prompt_set(write(tmp_path, data), ["a", "b"])
    assert prompts.prompts_for(0) == ["a ant"] and prompts.prompts_for(1) == ["a honey bee", "bees"]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"classnames": ["a", "b"], "templates": ["a photo of a thing"]}, "templates[0]"),
        ({"classnames": ["a", "b"], "templates": ["{c}"], "class_prompts": {"zebra": ["z"]}}, "unknown class 'zebra'"),
        ({"classnames": {"a": "a"}, "templates": ["{c}"]}, "missing ['b']"),
        ({"classnames": ["a"], "templates": ["{c}"]}, "has 1 names but the data has 2"),
        ({"classnames": ["a", "b"]}, "no 'templates'"),
        ({"classnames": ["a", "b"], "templates": "{c}"}, "'templates' must be a list"),
    ],
)
def test_malformed_prompt_files_name_the_file_and_field(tmp_path, data, message):
    path = write(tmp_path, data)
    with pytest.raises(EvalInputError, match=re.escape(message)) as err:
        load_prompt_set(path, ["a", "b"])
    assert str(path) in str(err.value)


def test_unknown_prompt_set_lists_the_shipped_ones():
    with pytest.raises(EvalInputError, match="pcam"):
        load_prompt_set("no_such_set")
