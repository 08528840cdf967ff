"""Deprecated: moved to `dynrefer_hf.shapes.tokenizer`."""

from ._deprecation import moved_module

__getattr__ = moved_module(__name__, "dynrefer_hf.shapes.tokenizer")
