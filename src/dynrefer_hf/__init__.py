"""dynrefer_hf: DynRefer region-level vision-language models as native Hugging Face Transformers models.

Importing this package registers the ``dynrefer`` model type with the Auto classes and the
``region-captioning`` pipeline task, so no ``trust_remote_code`` is needed.

The one exception is the ``dynrefer`` command itself (the console script or ``python -m dynrefer_hf.cli``):
there registration, which imports torch and transformers (seconds), is left to the command, which
calls `register` once its arguments are parsed, so that ``dynrefer --help`` and argument errors answer
at once. The public names below are imported on first use either way.
"""

import importlib
import itertools
import logging
import os
import sys

__version__ = "0.1.0"  # the one version source (setup.cfg reads it)

# public name -> the module defining it
_EXPORTS = {
    "DynReferConfig": "configuration_dynrefer",
    "DynReferForRegionCaptioning": "modeling_dynrefer",
    "DynReferImageProcessor": "image_processing_dynrefer",
    "DynReferOutput": "modeling_dynrefer",
    "DynReferPreTrainedModel": "modeling_dynrefer",
    "DynReferProcessor": "processing_dynrefer",
    "RegionCaptioningPipeline": "pipelines",
    "SHAPES_DEMO_PATH": "pretrained",
    "draw_regions": "visualize",
    "draw_views": "visualize",
}

__all__ = [
    "SHAPES_DEMO_PATH",
    "DynReferConfig",
    "DynReferForRegionCaptioning",
    "DynReferImageProcessor",
    "DynReferOutput",
    "DynReferPreTrainedModel",
    "DynReferProcessor",
    "RegionCaptioningPipeline",
    "__version__",
    "draw_regions",
    "draw_views",
    "register",
]


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_registered = False


def register() -> None:
    """Register DynRefer with transformers' Auto classes and the ``region-captioning`` pipeline task.

    Done by ``import dynrefer_hf``; calling it again does nothing.
    """
    global _registered
    if _registered:
        return
    _quiet_torchao_import()
    from transformers import (
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForImageTextToText,
        AutoProcessor,
    )

    from .configuration_dynrefer import DynReferConfig
    from .image_processing_dynrefer import DynReferImageProcessor
    from .modeling_dynrefer import DynReferForRegionCaptioning
    from .pipelines import register_pipeline
    from .processing_dynrefer import DynReferProcessor

    AutoConfig.register(DynReferConfig.model_type, DynReferConfig, exist_ok=True)
    AutoModel.register(DynReferConfig, DynReferForRegionCaptioning, exist_ok=True)
    AutoModelForImageTextToText.register(DynReferConfig, DynReferForRegionCaptioning, exist_ok=True)
    AutoImageProcessor.register(
        DynReferConfig, image_processor_classes={"pil": DynReferImageProcessor}, exist_ok=True
    )
    AutoProcessor.register(DynReferConfig, DynReferProcessor, exist_ok=True)
    register_pipeline()
    _registered = True


def _quiet_torchao_import() -> None:
    """transformers imports torchao (the int8 path) when it is installed; torchao then logs one warning per
    optional CUDA kernel it cannot load, and torch one per enum it registers, at every import. Drop those."""

    def not_import_noise(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Failed to load") or "is an Enum subclass" in message)

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).addFilter(not_import_noise)


def _started_as_the_command() -> bool:
    """Whether this process is the ``dynrefer`` command: its console script or ``python -m dynrefer_hf.cli``."""
    # the console script; a user's own `dynrefer.py` does not count (it may rely on the registration)
    if os.path.basename(sys.argv[0] if sys.argv else "") in (
        "dynrefer",
        "dynrefer.exe",
        "dynrefer-script.py",
    ):
        return True
    arguments = getattr(sys, "orig_argv", [])
    return any(
        flag == "-m" and module in ("dynrefer_hf.cli", "dynrefer_hf.cli.__main__")
        for flag, module in itertools.pairwise(arguments)
    )


if not _started_as_the_command():
    register()
