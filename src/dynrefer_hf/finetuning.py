"""Deprecated: moved to `dynrefer_hf.training.lora`."""

from ._deprecation import moved_module

__getattr__ = moved_module(__name__, "dynrefer_hf.training.lora")
