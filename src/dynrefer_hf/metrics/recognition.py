"""Region recognition metrics: attribute mAP (OVAD protocol) and class accuracy (docs/upstream/evaluation.md §5-§6)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import average_precision_score

__all__ = ["AttributeMAPResult", "attribute_map", "class_accuracy", "mean_ap_by_group"]


def _as_2d(name: str, array) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D [num_regions, num_labels], got shape {array.shape}")
    return array


@dataclass(frozen=True)
class AttributeMAPResult:
    """``map``: mean AP over attributes with a positive; ``per_attribute``: [A] AP, NaN without positives;
    ``groups``: the mean AP of each attribute group asked for (NaN when no attribute of it has a positive)."""

    map: float
    per_attribute: np.ndarray
    groups: dict[str, float] = field(default_factory=dict)


def attribute_map(scores, labels, groups=None) -> AttributeMAPResult:
    """OVAD attribute mAP (box oracle) of ``scores`` [N, A] against ``labels`` [N, A] in {1, 0, -1}.

    Per attribute, scikit-learn's ``average_precision_score`` over the regions labelled 0 or 1 (-1 =
    ignored); attributes without a positive are NaN and left out of the mean (upstream's ``nanmean``).
    ``groups`` (optional, [A] group names, e.g. OVAD's ``freq_set`` head/medium/tail) adds the mean AP of
    each group. Upstream reports the values x 100 (docs/upstream/evaluation.md §5).
    """
    scores, labels = _as_2d("scores", scores), _as_2d("labels", labels)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must have the same shape")
    if not np.isin(labels, (-1, 0, 1)).all():
        raise ValueError("attribute labels must be 1 (positive), 0 (negative) or -1 (ignored)")
    per_attribute = np.full(labels.shape[1], np.nan)
    for a in range(labels.shape[1]):
        kept = labels[:, a] != -1
        positives = labels[kept, a] == 1
        if positives.any():
            per_attribute[a] = average_precision_score(positives, scores[kept, a])
    if np.isnan(per_attribute).all():
        raise ValueError("no attribute has a positive label, so attribute mAP is undefined")
    group_maps = {} if groups is None else mean_ap_by_group(per_attribute, groups)
    return AttributeMAPResult(float(np.nanmean(per_attribute)), per_attribute, group_maps)


def mean_ap_by_group(per_attribute, groups) -> dict[str, float]:
    """The mean of ``per_attribute`` [A] APs (NaN = no positive, left out) within each group of ``groups``
    ([A] group names, e.g. OVAD's ``freq_set`` or ``parent_type``), in order of first appearance; NaN for a
    group none of whose attributes has a positive."""
    per_attribute, groups = np.asarray(per_attribute, dtype=np.float64), list(groups)
    if len(groups) != len(per_attribute):
        raise ValueError(f"groups names {len(groups)} attributes but there are {len(per_attribute)}")
    means = {}
    for name in dict.fromkeys(groups):
        values = per_attribute[[g == name for g in groups]]
        means[name] = float("nan") if np.isnan(values).all() else float(np.nanmean(values))
    return means


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
