"""The region dataset schema shared by every dataset this library trains or evaluates on.

One record is one image with all of its annotated regions (upstream's evaluation layout,
docs/upstream/evaluation.md §2); per-region fields are parallel lists. See docs/data.md for the full description.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from datasets import ClassLabel, Features, Image, List, Value

__all__ = [
    "ATTRIBUTE_IGNORE",
    "RegionVocabulary",
    "region_features",
    "validate_region_record",
]

# Attribute label meaning "not annotated / ambiguous" (OVAD's -1); evaluation drops these.
ATTRIBUTE_IGNORE = -1


@dataclass(frozen=True)
class RegionVocabulary:
    """The label spaces of a region dataset.

    Attributes are named ``"group:value"`` as in OVAD (``"color:red"``); a region's ``attributes``
    row holds one label per name, in this order (1 positive, 0 negative, -1 ignored).
    """

    classes: tuple[str, ...]
    attributes: tuple[str, ...]
    tags: tuple[str, ...]

    def __post_init__(self) -> None:
        for field_name in ("classes", "attributes", "tags"):
            names = getattr(self, field_name)
            if len(set(names)) != len(names):
                raise ValueError(f"RegionVocabulary.{field_name} has duplicate names")
        malformed = [name for name in self.attributes if name.count(":") != 1]
        if malformed:
            raise ValueError(f"attribute names must look like 'group:value', got {malformed[:3]}")

    @property
    def attribute_groups(self) -> tuple[str, ...]:
        """The group of each attribute, in attribute order (``"color"`` for ``"color:red"``)."""
        return tuple(name.split(":")[0] for name in self.attributes)

    @property
    def attribute_values(self) -> tuple[str, ...]:
        """The value word of each attribute, in attribute order (``"red"`` for ``"color:red"``)."""
        return tuple(name.split(":")[1] for name in self.attributes)


def region_features(vocabulary: RegionVocabulary) -> Features:
    """The ``datasets.Features`` of the region schema for ``vocabulary``."""
    return Features(
        {
            "image_id": Value("int64"),
            "image": Image(),
            "boxes": List(List(Value("float32"), length=4)),
            "captions": List(Value("string")),
            "tags": List(List(Value("string"))),
            "attributes": List(List(Value("int8"))),
            "classes": List(ClassLabel(names=list(vocabulary.classes))),
        }
    )


def validate_region_record(record: Mapping, vocabulary: RegionVocabulary) -> None:
    """Raise ``ValueError`` naming the first problem in ``record``; return ``None`` when it is valid.

    Checks that the per-region lists are parallel, that boxes are finite ``x1 < x2, y1 < y2`` inside
    the image, that tags and classes belong to ``vocabulary`` (class -1 = unlabelled) and that each
    attribute row is empty (unlabelled) or has one label in {-1, 0, 1} per attribute.
    """
    boxes = record["boxes"]
    num_regions = len(boxes)
    for key in ("captions", "tags", "attributes", "classes"):
        if len(record[key]) != num_regions:
            raise ValueError(f"record has {num_regions} boxes but {len(record[key])} {key}")
    width, height = record["image"].size
    for box in boxes:
        if len(box) != 4 or not all(math.isfinite(value) for value in box):
            raise ValueError(f"box {list(box)} is not 4 finite numbers")
        x1, y1, x2, y2 = box
        if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
            raise ValueError(f"box {list(box)} is empty or outside the {width}x{height} image")
    known_tags = set(vocabulary.tags)
    for region_tags in record["tags"]:
        unknown = [tag for tag in region_tags if tag not in known_tags]
        if unknown:
            raise ValueError(f"tags {unknown} are not in the vocabulary")
    for labels in record["attributes"]:
        if labels and (len(labels) != len(vocabulary.attributes) or not set(labels) <= {-1, 0, 1}):
            raise ValueError(
                f"an attribute row must be empty or hold {len(vocabulary.attributes)} labels in {{-1, 0, 1}}"
            )
    for label in record["classes"]:
        if not -1 <= label < len(vocabulary.classes):
            raise ValueError(f"class index {label} is outside [-1, {len(vocabulary.classes)})")
