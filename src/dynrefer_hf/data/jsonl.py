"""A JSON Lines file of ``{"image", "boxes", "captions", ...}`` records as a region dataset.

One line per image::

    {"image": "kitchen.jpg", "boxes": [[10, 20, 200, 180], [150, 40, 320, 300]],
     "captions": ["a red kettle", "a window"], "classes": ["kettle", null], "tags": [["red", "kettle"], []]}

``image`` is a path, relative to ``images`` (default: the file's folder); ``boxes`` are x1, y1, x2, y2 pixels.
Optional: ``captions`` (one string per box), ``tags`` (a list of words per box), ``classes`` (a name or null
per box; the names form the class list unless ``class_names`` is given), ``image_id`` (default: the line
number) and ``annotation_ids`` (default: regions numbered from 0 through the file).
"""

from __future__ import annotations

import json
import os

import PIL.Image

from .common import (
    LAYOUTS,
    AnnotationError,
    build_region_dataset,
    check_box,
    file_signature,
    loader_features,
    records_by_layout,
)
from .schema import RegionVocabulary

__all__ = ["load_jsonl_regions"]

_KEYS = {"image", "boxes", "captions", "tags", "classes", "image_id", "annotation_ids"}


def _lines(path):
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise AnnotationError(path, f"line {number}", "(whole line)", f"is not valid JSON ({error})") from None
            if not isinstance(item, dict):
                raise AnnotationError(path, f"line {number}", "(whole line)", "must be a JSON object")
            unknown = sorted(set(item) - _KEYS)
            if unknown:
                raise AnnotationError(path, f"line {number}", unknown[0], f"is not a known key ({sorted(_KEYS)})")
            yield number, item


def _per_box(item, key, count, path, record, default, check):
    values = item.get(key)
    if values is None:
        return [default() for _ in range(count)]
    if not isinstance(values, list) or len(values) != count:
        raise AnnotationError(path, record, key, f"must be a list with one entry per box ({count})")
    for value in values:
        if not check(value):
            raise AnnotationError(path, record, key, f"entry {value!r} has the wrong type")
    return values


def _jsonl_records(path, size, mtime_ns, images, layout, class_names):  # size, mtime_ns: cache key only
    class_index = {name: index for index, name in enumerate(class_names)}
    next_region = 0
    for number, item in _lines(path):
        record = f"line {number}"
        if not isinstance(item.get("image"), str):
            raise AnnotationError(path, record, "image", "is missing or not a path string")
        image_path = os.path.join(images, item["image"])
        if not os.path.isfile(image_path):
            raise AnnotationError(path, record, "image", f"image file not found: {image_path}")
        try:
            with PIL.Image.open(image_path) as opened:  # reads the header only
                width, height = opened.size
        except (PIL.UnidentifiedImageError, OSError) as error:
            raise AnnotationError(path, record, "image", f"{image_path} is not a readable image ({error})") from None
        boxes = item.get("boxes")
        if not isinstance(boxes, list) or not all(isinstance(box, list) for box in boxes):
            raise AnnotationError(path, record, "boxes", "must be a list of [x1, y1, x2, y2] boxes")
        boxes = [check_box(box, width, height, path, record, f"boxes[{i}]") for i, box in enumerate(boxes)]
        count = len(boxes)
        captions = _per_box(item, "captions", count, path, record, str, lambda v: isinstance(v, str))
        tags = _per_box(
            item, "tags", count, path, record, list, lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v)
        )
        names = _per_box(item, "classes", count, path, record, lambda: None, lambda v: v is None or v in class_index)
        ids = _per_box(
            item, "annotation_ids", count, path, record, lambda: None, lambda v: isinstance(v, int)
        )
        if item.get("annotation_ids") is None:
            ids = list(range(next_region, next_region + count))
        next_region += count
        image_id = item.get("image_id", number)
        if not isinstance(image_id, int):
            raise AnnotationError(path, record, "image_id", "must be an integer")
        regions = list(zip(ids, boxes, captions, tags, [-1 if n is None else class_index[n] for n in names]))
        yield from records_by_layout(image_id, image_path, regions, layout)


def load_jsonl_regions(
    path: str | os.PathLike,
    images: str | os.PathLike | None = None,
    *,
    class_names=None,
    layout: str = "image",
    cache_dir: str | None = None,
):
    """A JSON Lines region file as a ``datasets.Dataset`` (see the module docstring).

    ``class_names``: the class list (default: the names used in the file, in order of first use); a name not
    in it is an error. ``layout``: ``"image"`` or ``"region"``, as for `load_upstream_annotations`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    signature = file_signature(path)
    if class_names is None:
        used = {}
        for number, item in _lines(signature["path"]):
            for name in item.get("classes") or []:
                if name is not None and not isinstance(name, str):
                    raise AnnotationError(path, f"line {number}", "classes", f"entry {name!r} is not a class name")
                if name is not None:
                    used.setdefault(name, None)
        class_names = list(used)
    vocabulary = RegionVocabulary(classes=tuple(class_names), attributes=(), tags=())
    gen_kwargs = {
        **signature,
        "images": os.path.abspath(os.fspath(images)) if images is not None else os.path.dirname(signature["path"]),
        "layout": layout,
        "class_names": tuple(class_names),  # a list would be split into shards
    }
    return build_region_dataset(_jsonl_records, gen_kwargs, loader_features(vocabulary), cache_dir)
