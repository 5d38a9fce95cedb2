"""The label/concept vocabulary behind the multi-hot vectors of the semantic matching loss."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LabelVocab:
    """Top-K labels (class labels and UMLS CUIs) by training-split frequency; index = position."""

    labels: tuple[str, ...]

    @classmethod
    def from_counts(cls, counts: dict[str, int], top_k: int) -> LabelVocab:
        # Frequency first, then the label itself, so that ties never depend on dict order.
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return cls(tuple(label for label, _ in ranked[:top_k]))

    def __len__(self) -> int:
        return len(self.labels)

    def encode(self, sample_labels: list[str]) -> torch.Tensor:
        """Multi-hot float vector (V,); all zeros when no label of the sample is in the vocabulary."""
        index = self._index
        vec = torch.zeros(len(self.labels))
        for label in sample_labels:
            i = index.get(label)
            if i is not None:
                vec[i] = 1.0
        return vec

    @property
    def _index(self) -> dict[str, int]:
        cached = self.__dict__.get("_index_cache")
        if cached is None:
            cached = {label: i for i, label in enumerate(self.labels)}
            object.__setattr__(self, "_index_cache", cached)
        return cached

    def save(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"labels": list(self.labels)}, f, indent=1)

    @classmethod
    def load(cls, path) -> LabelVocab:
        with open(path, encoding="utf-8") as f:
            return cls(tuple(json.load(f)["labels"]))


def sample_labels(meta: dict) -> list[str]:
    """The labels of one sample's ``.json``: its class ``labels`` and its UMLS ``cuis``."""
    return list(meta.get("labels") or []) + list(meta.get("cuis") or [])
