"""Upstream DynRefer's COCO-like annotation files (docs/upstream/evaluation.md §2) as region datasets.

``load_upstream_annotations("refcocog_val.json", images="coco/train2014")`` reads a file with
``pycocotools.COCO`` and returns a ``datasets.Dataset`` in the record schema of docs/data.md, plus
``annotation_ids`` (to write predictions back by annotation id) and, when asked, ``masks``:

* region box from ``segmentation`` as upstream derives it (docs/upstream/views.md §1): polygons -> smallest /
  largest vertex coordinates, widened to one pixel when degenerate; RLE -> first / last mask column and row
  (inclusive);
* ``caption`` -> ``captions``; ``extra_info.parser_result.tag_set1`` / ``tag_set2`` (indices into the 4585 RAM
  tags, ``resources/ram_tag_list.txt``) -> ``tags`` (set 1 then set 2, duplicates once);
* ``extra_info.coco_result.category`` (a COCO class name) -> ``classes`` (the 80 names of ``resources/coco.json``);
* ``extra_info.ovad_result.att_vec`` (1 / 0 / -1) -> ``attributes``, named by the file's ``attrs``;
* image path = ``images`` (or the file's ``dataset.image_root``) / ``file_name``.

A missing image, a box outside its image, an unknown tag index or category, a malformed field, a field the
benchmark protocol scores missing (``required_fields``): an `AnnotationError` naming the file, the record and
the field. Nothing is skipped.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources

import numpy as np

from ..views import mask_to_box, widen_degenerate_box
from .common import LAYOUTS, AnnotationError, build_region_dataset, check_box, file_signature, loader_features
from .schema import RegionVocabulary

__all__ = [
    "ANNOTATION_FIELDS",
    "FREQUENCY_SETS",
    "coco_class_names",
    "load_upstream_annotations",
    "ram_tag_names",
    "read_annotation_file",
    "segmentation_box",
    "segmentation_rle",
    "upstream_vocabulary",
    "write_upstream_annotations",
]

# OVAD's attribute frequency groups (the ``freq_set`` of every entry of ``attrs``).
FREQUENCY_SETS = ("head", "medium", "tail")

# the annotation fields a benchmark protocol may need on every annotation (``required_fields``)
ANNOTATION_FIELDS = ("caption", "extra_info.coco_result.category", "extra_info.ovad_result.att_vec")


@lru_cache(maxsize=1)
def ram_tag_names() -> tuple[str, ...]:
    """The 4585 RAM tags; ``tag_set1`` / ``tag_set2`` index this list."""
    text = (resources.files("dynrefer_hf") / "resources" / "ram_tag_list.txt").read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines())


@lru_cache(maxsize=1)
def coco_class_names() -> tuple[str, ...]:
    """The 80 COCO class names in category-id order (``resources/coco.json``)."""
    return tuple(json.loads((resources.files("dynrefer_hf") / "resources" / "coco.json").read_text(encoding="utf-8")))


def read_annotation_file(path: str | os.PathLike):
    """``pycocotools.COCO`` of ``path``, with a clear error for a file that is not COCO-like JSON."""
    from pycocotools.coco import COCO

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as file:
            content = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AnnotationError(path, "the file", "(whole file)", f"is not valid JSON ({error})") from None
    if not isinstance(content, dict):
        raise AnnotationError(path, "the file", "(whole file)", "must be a JSON object with images and annotations")
    for key in ("images", "annotations"):
        if not isinstance(content.get(key), list):
            raise AnnotationError(path, "the file", key, "is missing or not a list")
    for index, image in enumerate(content["images"]):
        for field in ("id", "file_name", "width", "height"):
            if not isinstance(image, dict) or field not in image:
                raise AnnotationError(path, f"images[{index}]", field, "is missing")
    image_ids = {image["id"] for image in content["images"]}
    seen = set()
    for index, annotation in enumerate(content["annotations"]):
        if not isinstance(annotation, dict) or "id" not in annotation:
            raise AnnotationError(path, f"annotations[{index}]", "id", "is missing")
        if annotation["id"] in seen:
            raise AnnotationError(path, f"annotation id {annotation['id']}", "id", "is used twice")
        seen.add(annotation["id"])
        if annotation.get("image_id") not in image_ids:
            raise AnnotationError(
                path, f"annotation id {annotation['id']}", "image_id",
                f"{annotation.get('image_id')!r} is not the id of any image in the file (missing image)",
            )
    coco = COCO()
    coco.dataset = content
    with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints its progress
        coco.createIndex()
    return coco


def _rle(segmentation: dict, height: int, width: int) -> dict:
    import pycocotools.mask as mask_util

    if isinstance(segmentation.get("counts"), list):
        return mask_util.frPyObjects(segmentation, *segmentation["size"])
    counts = segmentation["counts"]
    return {"size": segmentation["size"], "counts": counts.encode() if isinstance(counts, str) else counts}


def _check_segmentation(segmentation, path, record: str) -> None:
    if isinstance(segmentation, list):
        if not segmentation or not all(
            isinstance(polygon, list) and len(polygon) >= 2 and len(polygon) % 2 == 0 for polygon in segmentation
        ):
            raise AnnotationError(
                path, record, "segmentation", "polygons must be a non-empty list of [x1, y1, x2, y2, ...] lists"
            )
    elif isinstance(segmentation, dict):
        if not {"size", "counts"} <= set(segmentation):
            raise AnnotationError(path, record, "segmentation", "an RLE mask needs 'size' [h, w] and 'counts'")
    else:
        raise AnnotationError(path, record, "segmentation", "is missing, or neither polygons nor an RLE mask")


def segmentation_box(segmentation, widen: bool = False, width: int = 0, height: int = 0) -> tuple[float, ...]:
    """The box (x1, y1, x2, y2) of a COCO ``segmentation`` by upstream's rules (docs/upstream/views.md §1).

    Polygons: the smallest and largest vertex coordinates over all polygons; with ``widen``, a box at most
    one pixel wide or high is widened as upstream's model input is (``views.widen_degenerate_box``; the
    dense-captioning evaluation does not widen). RLE (compressed or not): the first and last column / row
    holding a mask pixel, inclusive.
    """
    if isinstance(segmentation, list):
        points = np.concatenate([np.asarray(polygon, dtype=np.float64) for polygon in segmentation]).reshape(-1, 2)
        x1, y1 = points.min(axis=0)
        x2, y2 = points.max(axis=0)
        box = (float(x1), float(y1), float(x2), float(y2))
        return widen_degenerate_box(box, width, height) if widen else box
    import pycocotools.mask as mask_util

    height, width = segmentation["size"]
    return mask_to_box(mask_util.decode(_rle(segmentation, height, width)))


def segmentation_rle(segmentation, height: int, width: int) -> dict:
    """The region as one compressed COCO RLE ``{"size": [h, w], "counts": str}`` (polygons rasterised by pycocotools)."""
    import pycocotools.mask as mask_util

    if isinstance(segmentation, list):
        rle = mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    else:
        rle = _rle(segmentation, height, width)
    counts = rle["counts"]
    return {"size": [int(v) for v in rle["size"]], "counts": counts.decode() if isinstance(counts, bytes) else counts}


def _attribute_names(content: dict, path) -> tuple[str, ...]:
    attrs = content.get("attrs")
    if attrs is None:
        return ()
    try:
        ordered = sorted(attrs, key=lambda attr: attr["id"])
        return tuple(str(attr["name"]) for attr in ordered)
    except (TypeError, KeyError):
        raise AnnotationError(path, "the file", "attrs", "must be a list of {'id', 'name', ...} objects") from None


def upstream_vocabulary(path: str | os.PathLike) -> RegionVocabulary:
    """The label spaces of an upstream file: the 80 COCO classes, the file's ``attrs`` (OVAD's attribute names,
    in ``id`` order: the order of ``att_vec``) and the RAM tags."""
    return _vocabulary(read_annotation_file(path).dataset, path)


def _vocabulary(content: dict, path, class_names=None) -> RegionVocabulary:
    classes = coco_class_names() if class_names is None else tuple(class_names)
    return RegionVocabulary(classes, _attribute_names(content, path), ram_tag_names())


def _field_value(annotation: dict, name: str):
    """The value at the dotted ``name`` ("extra_info.coco_result.category"), None where any level is missing."""
    value = annotation
    for key in name.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _check_required(annotation: dict, path, record: str, required_fields) -> None:
    for name in required_fields:
        if _field_value(annotation, name) is None:
            present = ", ".join(sorted(annotation))
            raise AnnotationError(
                path, record, name, f"is missing, and this evaluation scores it on every annotation (present: {present})"
            )


def _region_fields(
    annotation: dict,
    image: dict,
    path,
    vocabulary: RegionVocabulary,
    class_index: dict | None,
    masks: bool,
    required_fields=(),
):
    record = f"annotation id {annotation['id']}"
    _check_required(annotation, path, record, required_fields)
    segmentation = annotation.get("segmentation")
    _check_segmentation(segmentation, path, record)
    width, height = int(image["width"]), int(image["height"])
    try:
        box = segmentation_box(segmentation, widen=True, width=width, height=height)
    except ValueError as error:  # an empty RLE mask
        raise AnnotationError(path, record, "segmentation", str(error)) from None
    box = check_box(box, width, height, path, record, "segmentation")
    caption = annotation.get("caption", "")
    if not isinstance(caption, str):
        raise AnnotationError(path, record, "caption", f"must be a string, got {type(caption).__name__}")
    extra = annotation.get("extra_info") or {}
    if not isinstance(extra, dict):
        raise AnnotationError(path, record, "extra_info", "must be an object")
    parser = extra.get("parser_result") or {}
    tags: list[str] = []
    for key in ("tag_set1", "tag_set2"):
        for index in parser.get(key, []):
            if not isinstance(index, int) or not 0 <= index < len(vocabulary.tags):
                raise AnnotationError(
                    path, record, f"extra_info.parser_result.{key}",
                    f"tag index {index!r} is not in [0, {len(vocabulary.tags)}) (the RAM tag list)",
                )
            tags.append(vocabulary.tags[index])
    tags = list(dict.fromkeys(tags))
    label = -1
    if "coco_result" in extra and class_index is not None:
        category = (extra["coco_result"] or {}).get("category")
        if category not in class_index:
            raise AnnotationError(
                path, record, "extra_info.coco_result.category",
                f"{category!r} is not one of the {len(class_index)} class names ({', '.join(list(class_index)[:5])}, ...)",
            )
        label = class_index[category]
    attributes: list[int] = []
    if "ovad_result" in extra:
        vector = (extra["ovad_result"] or {}).get("att_vec")
        if not vocabulary.attributes:
            raise AnnotationError(
                path, record, "extra_info.ovad_result.att_vec", "the file has no 'attrs' list naming the attributes"
            )
        if (
            not isinstance(vector, list)
            or len(vector) != len(vocabulary.attributes)
            or not set(vector) <= {-1, 0, 1}
        ):
            raise AnnotationError(
                path, record, "extra_info.ovad_result.att_vec",
                f"must hold {len(vocabulary.attributes)} labels in {{1, 0, -1}} (one per entry of 'attrs')",
            )
        attributes = [int(v) for v in vector]
    fields = {"box": box, "caption": caption, "tags": tags, "attributes": attributes, "class": label}
    if masks:
        fields["mask"] = segmentation_rle(segmentation, height, width)
    return fields


def _upstream_records(path, size, mtime_ns, images, layout, masks, class_names, read_classes, required_fields):  # size, mtime_ns: key
    coco = read_annotation_file(path)
    vocabulary = _vocabulary(coco.dataset, path, class_names)
    class_index = {name: index for index, name in enumerate(vocabulary.classes)} if read_classes else None
    image_root = images if images is not None else (coco.dataset.get("dataset") or {}).get("image_root")
    if image_root is None:
        raise AnnotationError(
            path, "the file", "dataset.image_root", "is missing: give the image folder (--images / images=)"
        )
    checked = set()
    for image in coco.dataset["images"]:
        image_path = os.path.join(image_root, image["file_name"])
        if image_path not in checked and not os.path.isfile(image_path):
            raise AnnotationError(path, f"image id {image['id']}", "file_name", f"image file not found: {image_path}")
        checked.add(image_path)
        regions = [
            _region_fields(annotation, image, path, vocabulary, class_index, masks, required_fields)
            for annotation in coco.imgToAnns.get(image["id"], [])
        ]
        ids = [annotation["id"] for annotation in coco.imgToAnns.get(image["id"], [])]
        groups = [(ids, regions)] if layout == "image" else [([i], [r]) for i, r in zip(ids, regions)]
        for group_ids, group in groups:
            record = {
                "image_id": image["id"],
                "image": image_path,
                "boxes": [r["box"] for r in group],
                "captions": [r["caption"] for r in group],
                "tags": [r["tags"] for r in group],
                "attributes": [r["attributes"] for r in group],
                "classes": [r["class"] for r in group],
                "annotation_ids": group_ids,
            }
            if masks:
                record["masks"] = [r["mask"] for r in group]
            yield record


def load_upstream_annotations(
    path: str | os.PathLike,
    images: str | os.PathLike | None = None,
    *,
    layout: str = "image",
    masks: bool = False,
    class_names=None,
    read_classes: bool = True,
    required_fields: Sequence[str] = (),
    cache_dir: str | None = None,
):
    """An upstream annotation file as a ``datasets.Dataset`` (see the module docstring).

    Args:
        path: the JSON file (``refcocog_val.json``, ``vg1.2/test.json``, ``test_ovad.json``, ...).
        images: the image folder; default: the file's ``dataset.image_root``.
        layout: ``"image"`` (one record per image with all its regions, for evaluation; images without
            annotations give records without regions) or ``"region"`` (one record per annotation, for
            training: upstream's ``obj_lvl``).
        masks: add ``masks``, every region as a compressed COCO RLE (decode with ``pycocotools.mask.decode``).
        class_names: the names ``coco_result.category`` may take, in class-index order (default: the 80 COCO
            names, as upstream; a model's ``config.class_names`` to evaluate it on its own classes).
        read_classes: ``False`` leaves every class unlabelled (-1) without reading ``coco_result`` (for a task
            that does not score classes, on a file labelled in other class names).
        required_fields: fields of `ANNOTATION_FIELDS` every annotation must hold (those a benchmark protocol
            scores): a missing one is an `AnnotationError` at load time, not a failure after the model has run.
        cache_dir: the ``datasets`` cache folder (default: ``datasets``' own). A second call with the same file
            (path, size, modification time) and options reads the cache instead of the JSON.

    The class names are ``class_names`` (``coco_result``, also in ``dataset.features``), the attribute names
    the file's ``attrs`` and the tags the RAM list: ``upstream_vocabulary(path)``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    unknown = [name for name in required_fields if name not in ANNOTATION_FIELDS]
    if unknown:
        raise ValueError(f"required_fields: {unknown} are not among {ANNOTATION_FIELDS}")
    signature = file_signature(path)
    # attribute names do not enter the features (rows of int8 labels): no need to read the file here
    vocabulary = RegionVocabulary(coco_class_names() if class_names is None else tuple(class_names), (), ram_tag_names())
    gen_kwargs = {
        **signature,
        "images": None if images is None else os.path.abspath(os.fspath(images)),
        "layout": layout,
        "masks": masks,
        "class_names": None if class_names is None else tuple(class_names),  # a list would be split into shards
        "read_classes": read_classes,
        "required_fields": tuple(required_fields),
    }
    return build_region_dataset(_upstream_records, gen_kwargs, loader_features(vocabulary, masks), cache_dir)


def _frequency_sets(attribute_rows: list[list[int]], num_attributes: int) -> list[str]:
    """head / medium / tail by number of positives: the most frequent third is head, the next medium."""
    positives = np.zeros(num_attributes, dtype=np.int64)
    for row in attribute_rows:
        if row:
            positives += np.asarray(row) == 1
    order = np.argsort(-positives, kind="stable")
    sets = [""] * num_attributes
    for rank, attribute in enumerate(order):
        sets[attribute] = FREQUENCY_SETS[min(2, rank * 3 // max(num_attributes, 1))]
    return sets


def write_upstream_annotations(
    dataset,
    vocabulary: RegionVocabulary,
    path: str | os.PathLike,
    image_dir: str | os.PathLike,
    *,
    one_region_per_image: bool = False,
    tags: bool = True,
) -> dict:
    """Write a region-schema ``dataset`` as an upstream annotation file (docs/upstream/evaluation.md §2).

    Images go to ``image_dir`` as PNG files (``dataset.image_root`` of the file); every region becomes an
    annotation whose ``segmentation`` is its box as a rectangle polygon (so the loaders give the same box back),
    with ``caption``, ``bbox`` (x1, y1, x2, y2, as upstream's files), ``tag_set1`` (indices into the RAM list;
    a tag outside it is an error; ``tags=False`` writes none), ``coco_result.category`` (the class name) and ``ovad_result.att_vec``
    (with ``attrs`` named by ``vocabulary.attributes``, grouped head / medium / tail by number of positives).
    ``one_region_per_image`` gives each region its own image record repeating the file name, the layout of
    upstream's region-captioning files (RefCOCOg, VG). Returns the written JSON content.
    """
    os.makedirs(image_dir, exist_ok=True)
    tag_index = {name: index for index, name in enumerate(ram_tag_names())}
    content = {"dataset": {"image_root": os.path.abspath(os.fspath(image_dir))}, "images": [], "annotations": []}
    all_attribute_rows = []
    for row, record in enumerate(dataset):
        file_name = f"{record['image_id']:06d}.png"
        record["image"].convert("RGB").save(os.path.join(image_dir, file_name))
        width, height = record["image"].size
        image_id = len(content["images"]) + 1
        for region, box in enumerate(record["boxes"]):
            if one_region_per_image or region == 0:
                image_id = len(content["images"]) + 1
                content["images"].append({"id": image_id, "file_name": file_name, "width": width, "height": height})
            x1, y1, x2, y2 = (float(v) for v in box)
            extra = {}
            if tags:
                unknown = [tag for tag in record["tags"][region] if tag not in tag_index]
                if unknown:
                    raise ValueError(f"record {row}, region {region}: tags {unknown} are not RAM tags (use tags=False)")
                extra["parser_result"] = {"tag_set1": [tag_index[t] for t in record["tags"][region]], "tag_set2": []}
            label = record["classes"][region]
            if label != -1:
                extra["coco_result"] = {"category": vocabulary.classes[label]}
            if record["attributes"][region]:
                extra["ovad_result"] = {"att_vec": [int(v) for v in record["attributes"][region]]}
                all_attribute_rows.append(list(record["attributes"][region]))
            content["annotations"].append(
                {
                    "id": len(content["annotations"]) + 1,
                    "image_id": image_id,
                    "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]],
                    "bbox": [x1, y1, x2, y2],
                    "caption": record["captions"][region],
                    "extra_info": extra,
                }
            )
    if all_attribute_rows:
        sets = _frequency_sets(all_attribute_rows, len(vocabulary.attributes))
        content["attrs"] = [
            {"id": i, "name": name, "type": name.split(":")[0], "parent_type": name.split(":")[0], "freq_set": sets[i]}
            for i, name in enumerate(vocabulary.attributes)
        ]
    with open(path, "w", encoding="utf-8") as file:
        json.dump(content, file)
    return content
