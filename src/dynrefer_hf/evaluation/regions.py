"""Evaluate a DynRefer model on a region-schema dataset: caption CIDEr-D, attribute mAP, class accuracy."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data.schema import ATTRIBUTE_IGNORE
from ..metrics import attribute_map, cider_d, class_accuracy

__all__ = ["RegionEvaluation", "evaluate_regions", "predict_regions"]


@dataclass(frozen=True)
class RegionEvaluation:
    """Scores of one evaluation, as fractions (``cider_d`` on pycocoevalcap's scale, where 1.0 prints as 100).

    A score is NaN when the dataset has no label of its kind.
    """

    cider_d: float
    attribute_map: float
    class_accuracy: float
    num_regions: int
    predictions: list[dict] = field(repr=False, default_factory=list)

    def percentages(self) -> dict[str, float]:
        """The scores x 100, as papers print them (CIDEr-D, attribute mAP, class accuracy)."""
        return {
            "cider_d": 100 * self.cider_d,
            "attribute_map": 100 * self.attribute_map,
            "class_accuracy": 100 * self.class_accuracy,
        }


@torch.no_grad()
def predict_regions(
    model,
    processor,
    dataset,
    batch_images: int = 8,
    view_selection: str | Sequence[float] | None = None,
    task: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    region_batch_size: int | None = None,
    generate_captions: bool = True,
    **generate_kwargs,
) -> list[dict]:
    """`model.generate` and `processor.post_process_generation` for every region of every record of ``dataset``
    (region schema), in order.

    Views follow ``view_selection`` / ``task`` (default: the image processor's own setting, the image prior);
    generation uses ``model.generation_config`` unless ``generate_kwargs`` override it. ``progress(done,
    total)`` is called after every batch of images. ``region_batch_size`` bounds the regions per forward pass
    (upstream: 20, docs/upstream/model.md §16; default: all regions of the batch of images at once).
    ``generate_captions=False``: heads only (`model.label_regions`), records without caption and score;
    ``generate_kwargs`` may then hold only ``tag_threshold``.
    """
    if region_batch_size is not None and region_batch_size < 1:
        raise ValueError(f"region_batch_size must be a positive number of regions, got {region_batch_size}")
    if not generate_captions and set(generate_kwargs) - {"tag_threshold"}:
        raise ValueError(
            f"generation settings {sorted(set(generate_kwargs) - {'tag_threshold'})} given with "
            "generate_captions=False, which runs no language model"
        )
    predict = model.generate if generate_captions else model.label_regions
    model.eval()
    device = model.device
    predictions: list[dict] = []
    total = len(dataset)
    for start in range(0, total, batch_images):
        records = dataset[start : start + batch_images]
        views = processor.image_processor(
            records["image"], boxes=records["boxes"], view_selection=view_selection, task=task
        )
        num_regions = len(views["pixel_values"])
        step = region_batch_size or max(num_regions, 1)
        for first in range(0, num_regions, step):
            outputs = predict(
                pixel_values=views["pixel_values"][first : first + step].to(device, model.dtype),
                view_boxes=views["view_boxes"][first : first + step].to(device),
                **generate_kwargs,
            )
            predictions.extend(processor.post_process_generation(outputs, model.config.tag_names))
        if progress is not None:
            progress(min(start + batch_images, total), total)
    return predictions


def evaluate_regions(model, processor, dataset, **predict_kwargs) -> RegionEvaluation:
    """Predict every region of ``dataset`` (see `predict_regions`) and score the predictions.

    * CIDEr-D: each region is its own document, its caption the single reference (docs/upstream/evaluation.md §3);
      regions with an empty caption are left out.
    * attribute mAP: OVAD's protocol (docs/upstream/evaluation.md §5); regions without attribute labels count as ignored.
    * class accuracy: top-1 over the regions with a class (docs/upstream/evaluation.md §6).
    """
    predictions = predict_regions(model, processor, dataset, **predict_kwargs)
    references = [caption for captions in dataset["captions"] for caption in captions]
    num_attributes = model.config.num_attributes
    attribute_labels = np.array(
        [
            list(labels) if len(labels) else [ATTRIBUTE_IGNORE] * num_attributes
            for rows in dataset["attributes"]
            for labels in rows
        ],
        dtype=np.int64,
    ).reshape(-1, num_attributes)
    class_labels = np.array([label for labels in dataset["classes"] for label in labels], dtype=np.int64)
    if len(predictions) != len(references):
        raise RuntimeError(f"got {len(predictions)} predictions for {len(references)} regions")

    nan = float("nan")
    captioned = [index for index, reference in enumerate(references) if reference.strip()]
    cider = (
        cider_d([predictions[i]["caption"] for i in captioned], [[references[i]] for i in captioned]).score
        if captioned
        else nan
    )
    attribute_scores = np.array([p["attribute_scores"] for p in predictions]).reshape(-1, num_attributes)
    mean_ap = attribute_map(attribute_scores, attribute_labels).map if (attribute_labels == 1).any() else nan
    class_scores = np.array([p["class_scores"] for p in predictions]).reshape(len(predictions), -1)
    accuracy = class_accuracy(class_scores, class_labels) if (class_labels != -1).any() else nan
    return RegionEvaluation(
        cider_d=cider,
        attribute_map=mean_ap,
        class_accuracy=accuracy,
        num_regions=len(predictions),
        predictions=predictions,
    )
