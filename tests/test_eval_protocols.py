"""The benchmark protocols' scoring of upstream result files (`dynrefer_hf.evaluation.score_result`), on
hand-made files small enough to check against scikit-learn directly."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from dynrefer_hf.evaluation import score_result

# OVAD-style attributes: one name, or several "/"-separated synonyms after the type
ATTRS = [
    {"id": 0, "name": "color:red", "type": "color", "parent_type": "color", "freq_set": "head"},
    {
        "id": 1,
        "name": "cleanliness:clean/neat",
        "type": "cleanliness",
        "parent_type": "state",
        "freq_set": "head",
    },
    {"id": 2, "name": "state:dry/arid/parched", "type": "state", "parent_type": "state", "freq_set": "tail"},
    {"id": 3, "name": "pattern:dotted", "type": "pattern", "parent_type": "pattern", "freq_set": "tail"},
]
LABELS = [[1, 0, 1, -1], [0, 1, 0, 0], [1, 1, -1, 1], [0, 0, 1, 0], [1, 0, 0, 0]]
SCORES = [
    [0.9, 0.2, 0.4, 0.1],
    [0.3, 0.6, 0.5, 0.2],
    [0.7, 0.3, 0.9, 0.8],
    [0.4, 0.1, 0.2, 0.3],
    [0.2, 0.5, 0.1, 0.6],
]


def _files(attrs, labels, scores):
    annotations = [
        {"id": i + 1, "image_id": 1, "extra_info": {"ovad_result": {"att_vec": row}}}
        for i, row in enumerate(labels)
    ]
    result = {
        "annotations": [
            {**a, "extra_info": {**a["extra_info"], "pred_result": {"attr": s}}}
            for a, s in zip(annotations, scores)
        ]
    }
    return result, {"annotations": annotations, "attrs": attrs}


def _ap(labels, scores, attribute):
    y = np.asarray(labels)[:, attribute]
    kept = y != -1
    return 100 * average_precision_score(y[kept], np.asarray(scores)[kept, attribute])


def test_ovad_reports_single_and_multiple_name_groups_as_upstream():
    metrics = score_result("ovad", *_files(ATTRS, LABELS, SCORES))
    aps = [_ap(LABELS, SCORES, attribute) for attribute in range(len(ATTRS))]
    assert metrics["ap/single"] == pytest.approx((aps[0] + aps[3]) / 2, rel=1e-12)
    assert metrics["ap/multiple"] == pytest.approx((aps[1] + aps[2]) / 2, rel=1e-12)
    assert metrics["ap/all"] == pytest.approx(np.mean(aps), rel=1e-12)
    # beside the frequency groups and the parent types
    assert metrics["ap/head"] == pytest.approx((aps[0] + aps[1]) / 2, rel=1e-12)
    assert metrics["ap/type/state"] == pytest.approx((aps[1] + aps[2]) / 2, rel=1e-12)


def test_ovad_single_and_multiple_are_reported_even_when_a_group_is_empty():
    attrs = [{**attr, "name": attr["name"].split("/")[0]} for attr in ATTRS]
    metrics = score_result("ovad", *_files(attrs, LABELS, SCORES))
    assert metrics["ap/multiple"] is None and metrics["ap/single"] == pytest.approx(
        metrics["ap/all"], rel=1e-12
    )
