"""Zero-shot prompt sets: class names, templates with a ``{c}`` placeholder, optional class-specific prompts.

File format (JSON or YAML; also what the data generator writes as ``DIR/zeroshot/<task>/prompts.json``)::

    name: pcam
    source: where the prompts come from
    classnames: {"<folder>": "<display name>"}   # or a list aligned with the sorted class folders
    templates: ["a photo of {c}.", ...]
    class_prompts: {"<folder>": ["full prompt", ...]}   # optional, replaces the templates for that class
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from medclip_train.evaluation.errors import EvalInputError

PLACEHOLDER = "{c}"
PROMPTS_DIR = Path(__file__).resolve().parent / "prompt_sets"  # package data: installed with the wheel
"""The prompt sets shipped with the project, addressable by file stem (``--prompts pcam``)."""
DEFAULT_TEMPLATES = ("a photo of {c}.",)


@dataclass
class PromptSet:
    """Prompts for the classes of one task, in label order."""

    classes: list[str]
    """Class ids in label order: folder names, label suffixes or ``classnames.txt`` lines."""
    classnames: list[str]
    """Display names put into the templates, aligned with ``classes``."""
    templates: list[str]
    class_prompts: dict[str, list[str]] = field(default_factory=dict)
    name: str = ""
    source: str = ""

    def prompts_for(self, index: int) -> list[str]:
        """The full prompts of class ``index``: its class-specific list, else the templates filled with its name."""
        class_id = self.classes[index]
        if class_id in self.class_prompts:
            return list(self.class_prompts[class_id])
        return [fill_template(t, self.classnames[index]) for t in self.templates]

    def subset(self, classes: list[str]) -> PromptSet:
        """The same prompts restricted to (and ordered as) ``classes``."""
        index = {c: i for i, c in enumerate(self.classes)}
        return PromptSet(
            classes=list(classes),
            classnames=[self.classnames[index[c]] for c in classes],
            templates=list(self.templates),
            class_prompts={c: p for c, p in self.class_prompts.items() if c in classes},
            name=self.name,
            source=self.source,
        )

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "classnames": dict(zip(self.classes, self.classnames)),
            "templates": list(self.templates),
            "class_prompts": dict(self.class_prompts),
        }


def fill_template(template: str, classname: str) -> str:
    # str.replace, not str.format: templates may contain other braces, and a missing placeholder is caught on load.
    return template.replace(PLACEHOLDER, classname)


def resolve_prompt_path(spec: str | Path) -> Path:
    """A prompt file path, or the name of a shipped set in ``evaluation/prompt_sets`` (``pcam``, ``modality``)."""
    path = Path(spec)
    if path.is_file():
        return path
    for suffix in (".yaml", ".yml", ".json"):
        shipped = PROMPTS_DIR / f"{spec}{suffix}"
        if shipped.is_file():
            return shipped
    known = ", ".join(shipped_prompt_sets())
    raise EvalInputError(f"--prompts {spec}: no such file, and not a shipped prompt set (known: {known})")


def shipped_prompt_sets() -> list[str]:
    return sorted(p.stem for p in PROMPTS_DIR.glob("*.y*ml"))


def read_prompt_file(path: str | Path) -> dict:
    """The raw mapping of a JSON or YAML prompt file, with a clear error when it cannot be parsed."""
    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{path}: prompt file not found")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise EvalInputError(f"{path}: cannot parse prompt file: {err}") from err
    if not isinstance(data, dict):
        raise EvalInputError(f"{path}: a prompt file must be a mapping with 'classnames' and 'templates'")
    return data


def load_prompt_set(spec: str | Path, classes: list[str] | None = None) -> PromptSet:
    """Load and validate a prompt file against the class ids of the data.

    Args:
        spec: a prompt file (JSON/YAML) or the name of a shipped set.
        classes: class ids of the data in label order (sorted folder names). ``None`` when the prompt file
            defines the classes (project shards: sorted ``classnames`` keys, or the ``classnames`` list).
    """
    path = resolve_prompt_path(spec)
    return parse_prompt_set(read_prompt_file(path), classes, where=str(path))


def parse_prompt_set(data: dict, classes: list[str] | None = None, where: str = "prompts") -> PromptSet:
    """Validate a prompt mapping; every error names ``where`` and the field."""
    templates = data.get("templates") or []
    if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
        raise EvalInputError(f"{where}: 'templates' must be a list of strings")
    for i, template in enumerate(templates):
        if PLACEHOLDER not in template:
            raise EvalInputError(f"{where}: templates[{i}] {template!r} has no {PLACEHOLDER} placeholder")
    class_ids, display = _parse_classnames(data.get("classnames"), classes, where)
    class_prompts = data.get("class_prompts") or {}
    if not isinstance(class_prompts, dict):
        raise EvalInputError(f"{where}: 'class_prompts' must map a class to a list of prompts")
    for class_id, prompts in class_prompts.items():
        if class_id not in class_ids:
            raise EvalInputError(f"{where}: class_prompts: unknown class {class_id!r} (classes: {class_ids})")
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise EvalInputError(f"{where}: class_prompts[{class_id!r}] must be a non-empty list of strings")
    if not templates:
        missing = [c for c in class_ids if c not in class_prompts]
        if missing:
            raise EvalInputError(f"{where}: no 'templates' and no class_prompts for classes {missing}")
    return PromptSet(
        classes=class_ids,
        classnames=display,
        templates=list(templates),
        class_prompts={str(k): list(v) for k, v in class_prompts.items()},
        name=str(data.get("name") or ""),
        source=str(data.get("source") or ""),
    )


def _parse_classnames(value, classes: list[str] | None, where: str) -> tuple[list[str], list[str]]:
    """(class ids, display names). A dict maps ids to names; a list is aligned with the sorted class ids."""
    if value is None:
        if classes is None:
            raise EvalInputError(f"{where}: 'classnames' is required when the data does not name its classes")
        return list(classes), [c.replace("_", " ") for c in classes]
    if isinstance(value, dict):
        names = {str(k): str(v) for k, v in value.items()}
        if classes is None:
            ids = sorted(names)
            return ids, [names[c] for c in ids]
        missing = [c for c in classes if c not in names]
        extra = [c for c in names if c not in classes]
        if missing or extra:
            raise EvalInputError(
                f"{where}: 'classnames' keys do not match the class folders: "
                + (f"missing {missing}" if missing else "")
                + ("; " if missing and extra else "")
                + (f"not in the data {extra}" if extra else "")
            )
        return list(classes), [names[c] for c in classes]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        if classes is None:
            return list(value), list(value)
        if len(value) != len(classes):
            raise EvalInputError(
                f"{where}: 'classnames' has {len(value)} names but the data has {len(classes)} classes {classes}"
            )
        return list(classes), list(value)
    raise EvalInputError(f"{where}: 'classnames' must be a mapping folder -> name or a list of names")


def default_prompt_set(classes: list[str], name: str = "") -> PromptSet:
    """Folder names as class names and one generic template, for data without a prompt file."""
    return PromptSet(
        classes=list(classes),
        classnames=[c.replace("_", " ") for c in classes],
        templates=list(DEFAULT_TEMPLATES),
        name=name,
        source="default: folder names and the template 'a photo of {c}.' (no prompt file given)",
    )
