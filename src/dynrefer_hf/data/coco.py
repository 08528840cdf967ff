"""A COCO detection file (``bbox`` in x, y, width, height) as a region dataset: the path for a user's own data.

``load_coco_detection("instances.json", images="images/")``: one record per image (or per annotation with
``layout="region"``) in the record schema of docs/data.md plus ``annotation_ids``. Classes are the file's
``categories`` (in id order); an annotation may carry a ``caption`` string (the region's reference / training
text) and ``tags`` (a list of words). Problems raise `AnnotationError` naming file, record and field.
"""

from __future__ import annotations

import json
import os

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
from .upstream import read_annotation_file

__all__ = ["coco_categories", "load_coco_detection"]


def coco_categories(content: dict, path) -> tuple[list[int], list[str]]:
    """Category ids and names of a COCO file, sorted by id."""
    categories = content.get("categories", [])
    if not isinstance(categories, list):
        raise AnnotationError(path, "the file", "categories", "must be a list of {'id', 'name'} objects")
    try:
        ordered = sorted(categories, key=lambda category: category["id"])
        return [c["id"] for c in ordered], [str(c["name"]) for c in ordered]
    except (TypeError, KeyError):
        raise AnnotationError(path, "the file", "categories", "must be a list of {'id', 'name'} objects") from None


def _coco_records(path, size, mtime_ns, images, layout):  # size, mtime_ns: cache key only
    coco = read_annotation_file(path)
    category_ids, _ = coco_categories(coco.dataset, path)
    class_index = {category_id: index for index, category_id in enumerate(category_ids)}
    for image in coco.dataset["images"]:
        image_path = os.path.join(images, image["file_name"])
        if not os.path.isfile(image_path):
            raise AnnotationError(path, f"image id {image['id']}", "file_name", f"image file not found: {image_path}")
        regions = []
        for annotation in coco.imgToAnns.get(image["id"], []):
            record = f"annotation id {annotation['id']}"
            bbox = annotation.get("bbox")
            if not isinstance(bbox, list) or len(bbox) != 4:
                raise AnnotationError(path, record, "bbox", "must be [x, y, width, height]")
            x, y, w, h = bbox
            if not all(isinstance(v, (int, float)) for v in bbox):
                raise AnnotationError(path, record, "bbox", f"{bbox} is not 4 numbers")
            box = check_box([x, y, x + w, y + h], int(image["width"]), int(image["height"]), path, record, "bbox")
            caption = annotation.get("caption", "")
            if not isinstance(caption, str):
                raise AnnotationError(path, record, "caption", "must be a string")
            tags = annotation.get("tags", [])
            if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
                raise AnnotationError(path, record, "tags", "must be a list of strings")
            label = -1
            if "category_id" in annotation:
                if annotation["category_id"] not in class_index:
                    raise AnnotationError(
                        path, record, "category_id", f"{annotation['category_id']!r} is not a category id of the file"
                    )
                label = class_index[annotation["category_id"]]
            regions.append((annotation["id"], box, caption, tags, label))
        yield from records_by_layout(image["id"], image_path, regions, layout)


def load_coco_detection(
    path: str | os.PathLike, images: str | os.PathLike, *, layout: str = "image", cache_dir: str | None = None
):
    """A COCO detection file and its image folder as a ``datasets.Dataset`` (see the module docstring).

    ``layout``: ``"image"`` (one record per image, for evaluation) or ``"region"`` (one per annotation, for
    training). Cached like `load_upstream_annotations`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    signature = file_signature(path)
    with open(signature["path"], encoding="utf-8") as file:
        try:
            content = json.load(file)
        except json.JSONDecodeError as error:
            raise AnnotationError(path, "the file", "(whole file)", f"is not valid JSON ({error})") from None
    _, names = coco_categories(content if isinstance(content, dict) else {}, signature["path"])
    vocabulary = RegionVocabulary(classes=tuple(names), attributes=(), tags=())
    gen_kwargs = {**signature, "images": os.path.abspath(os.fspath(images)), "layout": layout}
    return build_region_dataset(_coco_records, gen_kwargs, loader_features(vocabulary), cache_dir)
