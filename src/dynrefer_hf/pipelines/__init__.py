"""Pipelines of the ``transformers.pipeline`` factory (``import dynrefer_hf`` registers them)."""

from .region_captioning import (
    DEFAULT_MODEL,
    DEFAULT_REGION_BATCH_SIZE,
    TASK,
    ModelSource,
    RegionCaptioningPipeline,
    register_pipeline,
)

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_REGION_BATCH_SIZE",
    "TASK",
    "ModelSource",
    "RegionCaptioningPipeline",
    "register_pipeline",
]
