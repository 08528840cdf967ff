"""Clicks to masks: transformers' SAM or SAM 2 turns points on an image into one binary mask per region.

DynRefer reads a region from its box; people point. ``PointSegmenter`` runs a promptable segmenter (a
``SamModel`` or ``Sam2Model`` with its processor, from a folder or Hub id) on the points of every region of
an image, all regions in one batch, and returns one boolean mask per region. The ``region-captioning``
pipeline (``points=``, ``segmenter=``) then describes those masks as it describes ``masks=``.

Points are pixels ``[x, y]`` of the image. A region is one point, or several points with labels (``1``: on
the object, ``0``: not on it, a "negative click"). SAM returns three candidate masks for a prompt; the one
with the best predicted IoU is kept, as SAM's own predictor does for ambiguous prompts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

__all__ = [
    "SEGMENTER_TYPES",
    "PointSegmenter",
    "RegionPoints",
    "check_points_inside",
    "mask_to_rle",
    "region_points",
]

# The transformers model types a segmenter may be: (model class, processor class) by name.
SEGMENTER_TYPES = {"sam": ("SamModel", "SamProcessor"), "sam2": ("Sam2Model", "Sam2Processor")}
# SAM's label for a padding point (regions with fewer points than the others are padded to a batch).
_PAD_LABEL = -10


@dataclass(frozen=True)
class RegionPoints:
    """The points of one region: ``points`` [K, 2] pixels (x, y), ``labels`` [K] (1 positive, 0 negative)."""

    points: np.ndarray
    labels: np.ndarray


def region_points(points, point_labels=None) -> list[RegionPoints]:
    """The regions given by ``points`` (and ``point_labels``), checked.

    ``points`` holds one entry per region: a point ``[x, y]`` (pixels) or a list of points
    (``[[120, 80], [[300, 210], [340, 260]]]`` is two regions, the second with two points).
    ``point_labels`` has one entry per region too, a label or a list of labels matching its points (1: on
    the object, 0: not on it); by default every point is positive.

    Raises:
        ValueError: points that are not pairs of numbers, labels that do not match the points or are not
            0/1, or a region without a positive point.
    """
    if isinstance(points, np.ndarray):
        points = points.tolist()
    if not isinstance(points, Sequence) or isinstance(points, str) or len(points) == 0:
        raise ValueError(
            f"points must be a non-empty list of [x, y] pixels (or of lists of them), got {points!r}"
        )
    if isinstance(point_labels, np.ndarray):
        point_labels = point_labels.tolist()
    if point_labels is not None and (
        not isinstance(point_labels, Sequence) or len(point_labels) != len(points)
    ):
        raise ValueError(f"point_labels must hold one entry per region ({len(points)}), got {point_labels!r}")
    regions = []
    for number, region in enumerate(points):
        region = [region] if _is_point(region) else region
        if not isinstance(region, Sequence) or not region or not all(_is_point(item) for item in region):
            raise ValueError(
                f"points of region {number} must be [x, y] pixels or a list of them, got {region!r}"
            )
        labels = [1] * len(region) if point_labels is None else point_labels[number]
        labels = labels if isinstance(labels, Sequence) else [labels]
        if len(labels) != len(region):
            raise ValueError(
                f"point_labels of region {number} must give one label per point ({len(region)}), got {labels!r}"
            )
        if any(isinstance(label, bool) or label not in (0, 1) for label in labels):
            raise ValueError(
                f"point_labels of region {number} must be 1 (on the object) or 0 (not on it), got {labels!r}"
            )
        if 1 not in labels:
            raise ValueError(f"region {number} has no positive point (label 1): say where the object is")
        regions.append(RegionPoints(np.asarray(region, dtype=np.float64), np.asarray(labels, dtype=np.int64)))
    return regions


def _is_point(item) -> bool:
    return (
        isinstance(item, (Sequence, np.ndarray))
        and not isinstance(item, str)
        and len(item) == 2
        and all(isinstance(value, (int, float, np.number)) and not isinstance(value, bool) for value in item)
    )


def check_points_inside(regions: Sequence[RegionPoints], width: int, height: int) -> None:
    """Raise a ``ValueError`` naming the first point not on a pixel of a ``width`` x ``height`` image."""
    for number, region in enumerate(regions):
        for x, y in region.points:
            if not (0 <= x < width and 0 <= y < height):
                raise ValueError(
                    f"point ({x:g}, {y:g}) of region {number} is outside the {width}x{height} image: "
                    f"x must be in [0, {width}) and y in [0, {height})"
                )


def mask_to_rle(mask: np.ndarray) -> dict:
    """A boolean mask [H, W] as COCO's run-length encoding, ``{"size": [H, W], "counts": str}`` (JSON-ready)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(side) for side in rle["size"]], "counts": rle["counts"].decode("ascii")}


def segmenter_config(name_or_path: str | os.PathLike, **kwargs):
    """The config of the segmenter at ``name_or_path`` (a folder or Hub id), checked to be SAM / SAM 2;
    cheap, so that callers can refuse a wrong segmenter before loading anything large.

    Raises:
        ValueError: the folder or id holds no model config, or one that is not SAM / SAM 2.
    """
    import transformers

    name = os.fspath(name_or_path)
    try:
        config = transformers.AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"segmenter {name!r} is not a model folder or Hub id that can be loaded: {error}"
        ) from None
    if config.model_type not in SEGMENTER_TYPES:
        raise ValueError(
            f"segmenter {name!r} is a {config.model_type!r} model; a segmenter must be one of transformers' "
            f"{' or '.join(repr(kind) for kind in SEGMENTER_TYPES)} models (e.g. facebook/sam-vit-base)"
        )
    return config


class PointSegmenter:
    """SAM or SAM 2 (transformers) as a function from an image and its regions' points to boolean masks.

    Example::

        segmenter = PointSegmenter.from_pretrained("facebook/sam-vit-base")
        masks = segmenter(image, region_points([[120, 80], [300, 210]]))   # [2, H, W] bool
    """

    def __init__(self, model: torch.nn.Module, processor) -> None:
        self.model = model.eval()
        self.processor = processor

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        **kwargs,
    ) -> PointSegmenter:
        """Load a SAM / SAM 2 model and its processor from a folder or Hub id, on ``device`` in ``dtype``.

        Raises:
            ValueError: the folder or id holds no model, or one that is not SAM / SAM 2.
        """
        import transformers

        name = os.fspath(name_or_path)
        config = segmenter_config(name, **kwargs)
        model_class, processor_class = (
            getattr(transformers, part) for part in SEGMENTER_TYPES[config.model_type]
        )
        try:
            processor = processor_class.from_pretrained(name, **kwargs)
        except ImportError as error:  # SAM 2's image processor needs torchvision
            raise ValueError(f"segmenter {name!r} cannot be loaded: {' '.join(str(error).split())}") from None
        model = model_class.from_pretrained(name, dtype=dtype, **kwargs)
        return cls(model.to(device) if device is not None else model, processor)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def __call__(
        self, image: PIL.Image.Image, regions: Sequence[RegionPoints], allow_empty: bool = False
    ) -> np.ndarray:
        """One boolean mask [H, W] per region of ``image`` (an RGB PIL image), as [N, H, W], in one batch.

        Raises:
            ValueError: a point outside the image, or (unless ``allow_empty``) a region whose mask is empty.
        """
        check_points_inside(regions, *image.size)
        most = max(len(region.points) for region in regions)
        points = [region.points.tolist() + [[0.0, 0.0]] * (most - len(region.points)) for region in regions]
        labels = [region.labels.tolist() + [_PAD_LABEL] * (most - len(region.labels)) for region in regions]
        inputs = self.processor(
            images=image, input_points=[points], input_labels=[labels], return_tensors="pt"
        )
        original_sizes = inputs.pop("original_sizes")
        reshaped_sizes = inputs.pop("reshaped_input_sizes", None)
        inputs = {
            key: value.to(self.device, self.model.dtype if value.is_floating_point() else None)
            for key, value in inputs.items()
        }
        outputs = self.model(**inputs, multimask_output=True)
        sizes = (original_sizes,) if reshaped_sizes is None else (original_sizes, reshaped_sizes)
        candidates = self.processor.post_process_masks(outputs.pred_masks.float().cpu(), *sizes)[
            0
        ]  # [N, 3, H, W]
        best = outputs.iou_scores[0].float().argmax(dim=-1).cpu()  # [N]
        masks = candidates[torch.arange(len(regions)), best].numpy().astype(bool)
        for number, mask in enumerate(masks):
            if not (allow_empty or mask.any()):
                raise ValueError(
                    f"the segmenter found no object at the points of region {number} "
                    f"({regions[number].points.tolist()}): its mask is empty; click elsewhere or add points"
                )
        return masks
