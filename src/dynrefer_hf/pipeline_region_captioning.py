"""Deprecated: moved to `dynrefer_hf.pipelines.region_captioning`."""

from ._deprecation import moved_module

__getattr__ = moved_module(__name__, "dynrefer_hf.pipelines.region_captioning")
