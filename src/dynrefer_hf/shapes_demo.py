"""Deprecated: moved to `dynrefer_hf.shapes.demo_model`."""

from ._deprecation import moved_module

__getattr__ = moved_module(__name__, "dynrefer_hf.shapes.demo_model")
