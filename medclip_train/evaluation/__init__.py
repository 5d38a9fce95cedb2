"""Evaluators: zero-shot classification, image-text retrieval, linear probe; ``medclip-eval`` is ``cli.main``."""

from medclip_train.evaluation.datasets import open_classification, open_retrieval
from medclip_train.evaluation.errors import EvalInputError
from medclip_train.evaluation.features import Encoder, FeatureCache
from medclip_train.evaluation.linear_probe import evaluate_linear_probe
from medclip_train.evaluation.metrics import classification_metrics, multilabel_metrics
from medclip_train.evaluation.prompts import PromptSet, load_prompt_set
from medclip_train.evaluation.retrieval import evaluate_retrieval, retrieval_metrics, roco_subset
from medclip_train.evaluation.suite import evaluate_suite
from medclip_train.evaluation.zeroshot import evaluate_zeroshot, zero_shot_classifier

__all__ = [
    "Encoder",
    "EvalInputError",
    "FeatureCache",
    "PromptSet",
    "classification_metrics",
    "evaluate_linear_probe",
    "evaluate_retrieval",
    "evaluate_suite",
    "evaluate_zeroshot",
    "load_prompt_set",
    "multilabel_metrics",
    "open_classification",
    "open_retrieval",
    "retrieval_metrics",
    "roco_subset",
    "zero_shot_classifier",
]
