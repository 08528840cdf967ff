"""Evaluation metrics of the paper's protocols (docs/upstream/evaluation.md §3-§6), delegating to the standard
implementations (pycocoevalcap, scikit-learn); each is also an `evaluate` module (`evaluate_module_path`)."""

from .captioning import (
    CAPTION_METRICS,
    CaptionScores,
    CiderResult,
    JavaNotFoundError,
    caption_scores,
    cider_d,
    meteor_scores,
    ptb_tokenize,
    require_java,
)
from .densecap import (
    DENSECAP_IOU_THRESHOLDS,
    DENSECAP_METEOR_THRESHOLDS,
    DenseCaptionImage,
    DenseCaptionRecord,
    assign_predictions,
    box_iou,
    dense_caption_map,
    interpolated_average_precision,
    merge_boxes,
)
from .modules import EVALUATE_MODULES, evaluate_module_path
from .recognition import AttributeMAPResult, attribute_map, class_accuracy, mean_ap_by_group

__all__ = [
    "CAPTION_METRICS",
    "DENSECAP_IOU_THRESHOLDS",
    "DENSECAP_METEOR_THRESHOLDS",
    "EVALUATE_MODULES",
    "AttributeMAPResult",
    "CaptionScores",
    "CiderResult",
    "DenseCaptionImage",
    "DenseCaptionRecord",
    "JavaNotFoundError",
    "assign_predictions",
    "attribute_map",
    "box_iou",
    "caption_scores",
    "cider_d",
    "class_accuracy",
    "dense_caption_map",
    "evaluate_module_path",
    "interpolated_average_precision",
    "mean_ap_by_group",
    "merge_boxes",
    "meteor_scores",
    "ptb_tokenize",
    "require_java",
]
