"""Evaluation metrics, each validated in the tests against its reference implementation."""

from .cider import CiderResult, cider_d, simple_tokenize
from .recognition import AttributeMAPResult, attribute_map, average_precision, class_accuracy

__all__ = [
    "AttributeMAPResult",
    "CiderResult",
    "attribute_map",
    "average_precision",
    "cider_d",
    "class_accuracy",
    "simple_tokenize",
]
