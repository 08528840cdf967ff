"""Region datasets: the shared record schema and the synthetic shapes scenes."""

from .schema import ATTRIBUTE_IGNORE, RegionVocabulary, region_features, validate_region_record
from .shapes import (
    CAPTION_FIELDS,
    CONTEXT_FIELDS,
    CONTEXT_LABEL_SIZES,
    SHAPES_SPLITS,
    SHAPES_VOCABULARY,
    build_shapes_dataset,
    caption_field_accuracy,
    context_labels,
    generate_scene,
    parse_caption,
    scene_record,
    shapes_split,
)

__all__ = [
    "ATTRIBUTE_IGNORE",
    "CAPTION_FIELDS",
    "CONTEXT_FIELDS",
    "CONTEXT_LABEL_SIZES",
    "SHAPES_SPLITS",
    "SHAPES_VOCABULARY",
    "RegionVocabulary",
    "build_shapes_dataset",
    "caption_field_accuracy",
    "context_labels",
    "generate_scene",
    "parse_caption",
    "region_features",
    "scene_record",
    "shapes_split",
    "validate_region_record",
]
