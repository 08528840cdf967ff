"""`evaluate` module: OVAD attribute mAP, box oracle (docs/upstream/evaluation.md §5)."""

import datasets
import evaluate
import numpy as np
from dynrefer_hf.metrics.recognition import attribute_map

_DESCRIPTION = """OVAD attribute mAP: per attribute, scikit-learn's average precision over the regions labelled
1 or 0 (-1 = ignored), attributes without a positive left out of the mean; optional group breakdown
(OVAD's head/medium/tail). Values are fractions; OVAD prints them x 100."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per region, one score in [0, 1] per attribute.
    references: per region, one label per attribute: 1 positive, 0 negative, -1 ignored.
    groups: optional, the group name of every attribute (e.g. "head", "medium", "tail").
Returns:
    {"map": float, "per_attribute": [float], "groups": {name: float}}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class OvadAttributeMap(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Sequence(datasets.Value("int8")),
                }
            ),
        )

    def _compute(self, predictions, references, groups=None):
        result = attribute_map(np.asarray(predictions), np.asarray(references), groups=groups)
        return {"map": result.map, "per_attribute": result.per_attribute.tolist(), "groups": result.groups}
