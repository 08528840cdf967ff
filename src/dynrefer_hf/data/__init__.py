"""Region datasets: the shared record schema (docs/data.md) and loaders for annotation files."""

from .coco import load_coco_detection
from .common import LAYOUTS, AnnotationError
from .jsonl import load_jsonl_regions
from .schema import ATTRIBUTE_IGNORE, RegionVocabulary, region_features, validate_region_record
from .upstream import (
    FREQUENCY_SETS,
    coco_class_names,
    load_upstream_annotations,
    ram_tag_names,
    read_annotation_file,
    segmentation_box,
    segmentation_rle,
    upstream_vocabulary,
    write_upstream_annotations,
)

__all__ = [
    "ATTRIBUTE_IGNORE",
    "FREQUENCY_SETS",
    "LAYOUTS",
    "AnnotationError",
    "RegionVocabulary",
    "coco_class_names",
    "load_coco_detection",
    "load_jsonl_regions",
    "load_upstream_annotations",
    "ram_tag_names",
    "read_annotation_file",
    "region_features",
    "segmentation_box",
    "segmentation_rle",
    "upstream_vocabulary",
    "validate_region_record",
    "write_upstream_annotations",
]
