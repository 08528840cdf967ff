"""`evaluate` module: the dense-captioning mAP of docs/upstream/evaluation.md §4."""

import datasets
import evaluate
from dynrefer_hf.metrics.densecap import DenseCaptionImage
from dynrefer_hf.metrics.densecap import dense_caption_map

_DESCRIPTION = """Dense-captioning mAP (densecap / DynRefer): ground-truth boxes merged at IoU 0.7, greedy
assignment of predictions by score, METEOR 1.5 per assignment (Java), APs at IoU {0.3..0.7} x METEOR
{0..0.25}, their mean ("map") and the detection-only mean ("detmap"), as fractions."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one entry per image: {"boxes": [[x1, y1, x2, y2], ...], "scores": [...], "captions": [...]}.
    references: one entry per image: {"boxes": [[x1, y1, x2, y2], ...], "captions": [...]}.
Returns:
    {"map", "detmap", "ap_breakdown", "det_breakdown", "num_images", "num_predictions", "num_gt_boxes"}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DenseCaptioningMap(evaluate.Metric):
    def _info(self):
        boxes = datasets.Sequence(datasets.Sequence(datasets.Value("float64")))
        texts = datasets.Sequence(datasets.Value("string"))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {
                        "boxes": boxes,
                        "scores": datasets.Sequence(datasets.Value("float64")),
                        "captions": texts,
                    },
                    "references": {"boxes": boxes, "captions": texts},
                }
            ),
        )

    def _compute(self, predictions, references):
        images = [
            DenseCaptionImage(
                gt_boxes=reference["boxes"],
                gt_captions=reference["captions"],
                boxes=prediction["boxes"],
                scores=prediction["scores"],
                captions=prediction["captions"],
            )
            for prediction, reference in zip(predictions, references)
        ]
        return dense_caption_map(images)
