"""Region datasets: the shared record schema and the synthetic shapes scenes."""

from .schema import ATTRIBUTE_IGNORE, RegionVocabulary, region_features, validate_region_record
from .shapes import (
    SHAPES_SPLITS,
    SHAPES_VOCABULARY,
    build_shapes_dataset,
    generate_scene,
    scene_record,
    shapes_split,
)

__all__ = [
    "ATTRIBUTE_IGNORE",
    "SHAPES_SPLITS",
    "SHAPES_VOCABULARY",
    "RegionVocabulary",
    "build_shapes_dataset",
    "generate_scene",
    "region_features",
    "scene_record",
    "shapes_split",
    "validate_region_record",
]
