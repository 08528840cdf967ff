"""What the annotation-file loaders share: their error type, box checks, the cached ``datasets`` build."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping

import datasets
from datasets import Features, Image, List, Value

from .schema import RegionVocabulary, region_features

__all__ = [
    "LAYOUTS",
    "AnnotationError",
    "build_region_dataset",
    "check_box",
    "loader_features",
    "records_by_layout",
]

# "image": one record per image with all of its regions (evaluation); "region": one record per region
# (training, upstream's `obj_lvl: True`, docs/upstream/evaluation.md §2).
LAYOUTS = ("image", "region")


class AnnotationError(ValueError):
    """A problem in an annotation file, naming the file, the record and the field."""

    def __init__(self, path: str | os.PathLike, record: str, field: str, problem: str):
        self.path, self.record, self.field = os.fspath(path), record, field
        super().__init__(f"{self.path}: {record}, field {field!r}: {problem}")


def check_box(box, width: int, height: int, path, record: str, field: str) -> list[float]:
    """``box`` (xyxy) as 4 floats when it is finite, non-empty and inside the ``width`` x ``height`` image."""
    if len(box) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
        raise AnnotationError(path, record, field, f"{list(box)} is not 4 finite numbers")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (x1 < x2 and y1 < y2):
        raise AnnotationError(path, record, field, f"box {[x1, y1, x2, y2]} is empty (needs x1 < x2 and y1 < y2)")
    if not (0 <= x1 and 0 <= y1 and x2 <= width and y2 <= height):
        raise AnnotationError(path, record, field, f"box {[x1, y1, x2, y2]} lies outside the {width}x{height} image")
    return [x1, y1, x2, y2]


def loader_features(vocabulary: RegionVocabulary, masks: bool = False) -> Features:
    """The record schema (docs/data.md) plus ``annotation_ids`` (and ``masks``, COCO RLE, when asked).

    Images are stored as paths and decoded to RGB on access (``Image(mode="RGB")``, as upstream opens them
    with ``.convert("RGB")``), so a dataset of 100k images is cheap to build and to keep.
    """
    features = region_features(vocabulary)
    features["image"] = Image(mode="RGB")
    features["annotation_ids"] = List(Value("int64"))
    if masks:
        features["masks"] = List({"size": List(Value("int32"), length=2), "counts": Value("string")})
    return features


def file_signature(path: str | os.PathLike) -> dict:
    """Path, size and modification time: a changed file gets a new ``datasets`` cache entry."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    stat = os.stat(path)
    return {"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def build_region_dataset(
    generator: Callable, gen_kwargs: Mapping, features: Features, cache_dir: str | None = None
) -> datasets.Dataset:
    """``Dataset.from_generator`` (cached under ``cache_dir`` / the ``datasets`` cache: a second build with the
    same file and options reads the cache), re-raising the loader's `AnnotationError` as itself."""
    try:
        return datasets.Dataset.from_generator(
            generator, features=features, gen_kwargs=dict(gen_kwargs), cache_dir=cache_dir
        )
    except datasets.exceptions.DatasetGenerationError as error:
        cause = error.__cause__
        while cause is not None and not isinstance(cause, (AnnotationError, FileNotFoundError)):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def records_by_layout(image_id: int, image_path: str, regions: list[tuple], layout: str):
    """Region records of one image: one with every region (``layout="image"``) or one per region.

    ``regions`` holds ``(annotation_id, box, caption, tags, class_index)`` tuples; attributes stay empty.
    """
    groups = [regions] if layout == "image" else [[region] for region in regions]
    for group in groups:
        yield {
            "image_id": image_id,
            "image": image_path,
            "boxes": [r[1] for r in group],
            "captions": [r[2] for r in group],
            "tags": [r[3] for r in group],
            "attributes": [[] for _ in group],
            "classes": [r[4] for r in group],
            "annotation_ids": [r[0] for r in group],
        }
