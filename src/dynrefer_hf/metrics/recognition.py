"""Region recognition metrics: attribute mAP (OVAD protocol) and class accuracy (docs/upstream/evaluation.md §5-§6)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["AttributeMAPResult", "attribute_map", "average_precision", "class_accuracy"]


def _as_2d(name: str, array) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D [num_regions, num_labels], got shape {array.shape}")
    return array


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision of binary ``labels`` ranked by ``scores`` (both [N]), as scikit-learn defines it.

    AP = sum over the distinct score thresholds (high to low) of (recall step) x precision, equal
    scores forming one threshold. NaN when there is no positive.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    num_positives = labels.sum()
    if num_positives == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    true_positives = np.cumsum(labels)
    # The last position of each run of equal scores is one threshold.
    threshold_ends = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    true_positives = true_positives[threshold_ends]
    precision = true_positives / (threshold_ends + 1)
    recall_steps = np.diff(np.r_[0, true_positives]) / num_positives
    return float(np.sum(recall_steps * precision))


@dataclass(frozen=True)
class AttributeMAPResult:
    """``map``: mean AP over attributes with a positive; ``per_attribute``: [A] AP, NaN without positives."""

    map: float
    per_attribute: np.ndarray


def attribute_map(scores, labels) -> AttributeMAPResult:
    """OVAD attribute mAP (box oracle) of ``scores`` [N, A] against ``labels`` [N, A] in {1, 0, -1}.

    Per attribute, AP over the regions labelled 0 or 1 (-1 = ignored); attributes without a positive
    are NaN and left out of the mean (upstream's ``nanmean``). Upstream reports ``map`` x 100.
    """
    scores, labels = _as_2d("scores", scores), _as_2d("labels", labels)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must have the same shape")
    if not np.isin(labels, (-1, 0, 1)).all():
        raise ValueError("attribute labels must be 1 (positive), 0 (negative) or -1 (ignored)")
    per_attribute = np.array(
        [
            average_precision(scores[labels[:, a] != -1, a], labels[labels[:, a] != -1, a] == 1)
            for a in range(labels.shape[1])
        ]
    )
    if np.isnan(per_attribute).all():
        raise ValueError("no attribute has a positive label, so attribute mAP is undefined")
    return AttributeMAPResult(map=float(np.nanmean(per_attribute)), per_attribute=per_attribute)


def class_accuracy(class_scores, class_labels) -> float:
    """Top-1 accuracy of ``class_scores`` [N, C] (argmax, first index on ties) against ``class_labels`` [N].

    Regions labelled -1 (no class annotated) are left out; upstream reports the value x 100.
    """
    class_scores = _as_2d("class_scores", class_scores)
    class_labels = np.asarray(class_labels)
    if class_labels.shape != (class_scores.shape[0],):
        raise ValueError(f"class_labels must have shape ({class_scores.shape[0]},), got {class_labels.shape}")
    if ((class_labels < -1) | (class_labels >= class_scores.shape[1])).any():
        raise ValueError(f"class labels must lie in [-1, {class_scores.shape[1]})")
    labelled = class_labels != -1
    if not labelled.any():
        raise ValueError("no region has a class label")
    predictions = class_scores[labelled].argmax(axis=1)
    return float((predictions == class_labels[labelled]).mean())
