"""Loading models for the subcommands, with one-sentence errors instead of tracebacks."""

from __future__ import annotations

import os

from ..cli import CommandError

__all__ = ["load_config", "load_region_captioner"]


def _unavailable(model: str, error: OSError) -> CommandError:
    """The user-facing error for a model that could not be loaded."""
    if os.path.isdir(model):
        return CommandError(f"cannot load the model folder {model}: {error}")
    return CommandError(
        f"model {model!r} is neither a local folder nor in the Hugging Face cache and could not be downloaded; "
        f"get its weights on a machine with network access (`hf download {model}`, then copy the cache or the "
        "folder here) and pass --model PATH_TO_THE_FOLDER."
    )


def load_config(model: str, revision: str | None = None):
    """The ``DynReferConfig`` of ``model`` (a folder or a Hub id)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, revision=revision)
    except OSError as error:
        raise _unavailable(model, error) from None
    if config.model_type != "dynrefer":
        raise CommandError(f"{model} is a {config.model_type!r} model, not a DynRefer model")
    return config


def load_region_captioner(
    model: str, revision: str | None = None, device: str | None = None, dtype: str | None = None
):
    """The ``region-captioning`` pipeline for ``model`` on ``device`` (default: CUDA when available)."""
    import torch
    from transformers import pipeline

    load_config(model, revision)  # a clear error before the pipeline factory tries anything else
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: no CUDA device is available here; use --device cpu")
    try:
        return pipeline(
            "region-captioning", model=model, revision=revision, device=device, dtype=dtype or "auto"
        )
    except OSError as error:
        raise _unavailable(model, error) from None
