"""Dense-captioning mAP (docs/upstream/evaluation.md §4): the densecap evaluator as upstream DynRefer runs it.

Per image: ground-truth boxes overlapping at IoU >= 0.7 are merged (their captions pooled as references),
predictions are assigned greedily by score to their best merged box, every assignment is scored by
METEOR (all in one Java process, `meteor_scores`), and over all images the 5 IoU x 6 METEOR thresholds
give 30 interpolated APs whose mean is the mAP; METEOR threshold -1 gives the detection-only "detmap".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .captioning import meteor_scores

__all__ = [
    "DENSECAP_IOU_THRESHOLDS",
    "DENSECAP_METEOR_THRESHOLDS",
    "DenseCaptionImage",
    "DenseCaptionRecord",
    "assign_predictions",
    "box_iou",
    "dense_caption_map",
    "interpolated_average_precision",
    "merge_boxes",
]

DENSECAP_IOU_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
DENSECAP_METEOR_THRESHOLDS = (0, 0.05, 0.1, 0.15, 0.2, 0.25)
# Ground-truth boxes overlapping at least this much are one merged box.
MERGE_IOU = 0.7


def box_iou(boxes_a, boxes_b) -> np.ndarray:
    """IoU matrix [A, B] of xyxy boxes, areas (x2 - x1) * (y2 - y1) as torchvision's ``box_iou`` (float64)."""
    a = np.asarray(boxes_a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float64).reshape(-1, 4)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(bottom_right - top_left, 0, None)
    intersection = wh[..., 0] * wh[..., 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return intersection / (area_a[:, None] + area_b[None, :] - intersection)


def merge_boxes(boxes, threshold: float = MERGE_IOU) -> list[np.ndarray]:
    """Groups of ground-truth box indices, merged as densecap does.

    Repeatedly: count for every box its neighbours with IoU >= ``threshold`` (itself included), take the
    box with the most (the first on ties), make it and its neighbours one group, and remove the group's rows
    and columns from the IoU matrix; stop when no box has a neighbour left.
    """
    if threshold <= 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    iou = box_iou(boxes, boxes)
    groups = []
    while len(iou):
        good = iou >= threshold
        counts = good.sum(axis=0)
        top = int(np.argmax(counts))
        if counts[top] == 0:
            break
        members = np.flatnonzero(good[top])
        groups.append(members)
        iou[members, :] = 0
        iou[:, members] = 0
    return groups


@dataclass(frozen=True)
class DenseCaptionImage:
    """One image of a dense-captioning evaluation: its ground truth and its predictions (boxes xyxy)."""

    gt_boxes: Sequence[Sequence[float]]
    gt_captions: Sequence[str]
    boxes: Sequence[Sequence[float]]
    scores: Sequence[float]
    captions: Sequence[str]

    def __post_init__(self) -> None:
        if len(self.gt_boxes) != len(self.gt_captions):
            raise ValueError(f"{len(self.gt_boxes)} ground-truth boxes but {len(self.gt_captions)} captions")
        if not (len(self.boxes) == len(self.scores) == len(self.captions)):
            raise ValueError(
                f"{len(self.boxes)} predicted boxes, {len(self.scores)} scores and {len(self.captions)} "
                "captions: one of each per prediction"
            )


@dataclass(frozen=True)
class DenseCaptionRecord:
    """One prediction after assignment: its score, best IoU, whether it took its box, its texts."""

    score: float
    iou: float
    ok: bool
    candidate: str
    references: list[str] = field(default_factory=list)


def assign_predictions(image: DenseCaptionImage) -> tuple[list[DenseCaptionRecord], int]:
    """The records of one image (in descending score order, stable on ties) and its number of merged GT boxes.

    A prediction takes the merged box of largest IoU (the first on ties); it is ``ok`` when that IoU is
    positive and the box was not taken yet (the box is then taken, whatever the IoU threshold will be).
    """
    groups = merge_boxes(image.gt_boxes) if len(image.gt_boxes) else []
    gt_boxes = np.asarray(image.gt_boxes, dtype=np.float64).reshape(-1, 4)
    merged = np.array([gt_boxes[members].mean(axis=0) for members in groups]).reshape(-1, 4)
    merged_captions = [[image.gt_captions[i] for i in members] for members in groups]
    scores = np.asarray(image.scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    iou = box_iou(image.boxes, merged)
    used = np.zeros(len(merged), dtype=bool)
    records = []
    for index in order:
        if len(merged):
            best = int(np.argmax(iou[index]))
            largest = float(iou[index, best])
        else:
            best, largest = -1, 0.0
        ok = largest > 0 and not used[best]
        if ok:
            used[best] = True
        records.append(
            DenseCaptionRecord(
                score=float(scores[index]),
                iou=largest,
                ok=ok,
                candidate=image.captions[index],
                references=list(merged_captions[best]) if largest > 0 else [],
            )
        )
    return records, len(merged)


def interpolated_average_precision(true_positive: np.ndarray, num_positives: int) -> float:
    """100-point interpolated AP of records already sorted by score: the mean over recall levels
    r = 0, 0.01, ..., 0.99 of the best precision at recall >= r (0 when none).

    Recall, precision and levels are float32 as upstream's torch tensors (docs/upstream/evaluation.md §4):
    a float64 computation differs by up to ~1e-3 when ``num_positives`` divides 100.
    """
    tp = torch.cumsum(torch.as_tensor(true_positive, dtype=torch.float32), dim=0)
    fp = torch.cumsum(torch.as_tensor(~np.asarray(true_positive, dtype=bool), dtype=torch.float32), dim=0)
    recall = tp / num_positives
    precision = tp / (fp + tp)
    total = 0.0
    levels = torch.arange(0, 1, 0.01).tolist()
    for level in levels:
        total += torch.max(precision * torch.ge(recall, level)).item()
    return total / len(levels)


def dense_caption_map(
    images: Sequence[DenseCaptionImage],
    iou_thresholds: Sequence[float] = DENSECAP_IOU_THRESHOLDS,
    meteor_thresholds: Sequence[float] = DENSECAP_METEOR_THRESHOLDS,
    meteor=meteor_scores,
) -> dict:
    """Dense-captioning mAP of ``images`` (docs/upstream/evaluation.md §4).

    Images without predictions are left out entirely (their ground truth does not count). Records are
    ranked by score over all images with a stable descending sort (ties keep image order, then the order
    within the image). ``meteor(candidates, references) -> [N]`` scores the records (default: METEOR 1.5 in
    one Java process; records without references are never scored).

    Returns ``{"map", "ap_breakdown": {"iou_0.3_meteor_0": ...}, "detmap", "det_breakdown": {"iou_0.3": ...},
    "num_images", "num_predictions", "num_gt_boxes"}`` with APs as fractions.
    """
    records: list[DenseCaptionRecord] = []
    num_positives = 0
    num_images = 0
    for image in images:
        if len(image.scores) == 0:
            continue
        image_records, merged = assign_predictions(image)
        records.extend(image_records)
        num_positives += merged
        num_images += 1
    if not records:
        raise ValueError("dense-captioning mAP needs at least one prediction")
    if num_positives == 0:
        raise ValueError("dense-captioning mAP needs ground-truth boxes in the images that have predictions")
    meteors = np.asarray(meteor([r.candidate for r in records], [r.references for r in records]), dtype=np.float64)
    scores = torch.tensor([r.score for r in records], dtype=torch.float64)
    order = torch.sort(scores, descending=True, stable=True).indices.numpy()
    has_references = np.array([len(r.references) > 0 for r in records])[order]
    iou = np.array([r.iou for r in records])[order]
    ok = np.array([r.ok for r in records])[order]
    meteors = meteors[order]

    ap_breakdown, det_breakdown = {}, {}
    for iou_threshold in iou_thresholds:
        matched = has_references & (iou >= iou_threshold) & ok
        det_breakdown[f"iou_{iou_threshold}"] = interpolated_average_precision(matched, num_positives)
        for meteor_threshold in meteor_thresholds:
            true_positive = matched & (meteors > meteor_threshold)
            ap_breakdown[f"iou_{iou_threshold}_meteor_{meteor_threshold}"] = interpolated_average_precision(
                true_positive, num_positives
            )
    return {
        "map": sum(ap_breakdown.values()) / len(ap_breakdown),
        "ap_breakdown": ap_breakdown,
        "detmap": sum(det_breakdown.values()) / len(det_breakdown),
        "det_breakdown": det_breakdown,
        "num_images": num_images,
        "num_predictions": len(records),
        "num_gt_boxes": num_positives,
    }
