"""`evaluate` module: top-1 region recognition accuracy (docs/upstream/evaluation.md §6)."""

import datasets
import evaluate
from dynrefer_hf.metrics.recognition import class_accuracy

_DESCRIPTION = """Top-1 accuracy of per-region class scores (argmax, the first class on ties as np.argmax);
regions labelled -1 are left out. A fraction; DynRefer's README prints it x 100."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: per region, one score per class.
    references: per region, the class index (-1 = no class annotated).
Returns:
    {"accuracy": float}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RegionAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        return {"accuracy": class_accuracy(predictions, references)}
