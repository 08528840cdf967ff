"""Helpers shared by the subcommands: loading models with one-sentence errors, parsing boxes."""

from __future__ import annotations

import argparse
import os

from .errors import CommandError

__all__ = ["load_config", "load_region_captioner", "parse_box"]


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


def parse_box(text: str) -> list[float]:
    """``"x1,y1,x2,y2"`` (pixels) as four floats, with x2 > x1 and y2 > y1."""
    parts = text.replace(" ", "").split(",")
    try:
        box = [float(part) for part in parts]
    except ValueError:
        box = []
    if len(box) != 4 or len(parts) != 4:
        raise argparse.ArgumentTypeError(f"{text!r} is not a box: expected four numbers x1,y1,x2,y2")
    if not (box[2] > box[0] and box[3] > box[1]):
        raise argparse.ArgumentTypeError(f"{text!r} is an empty box: x2 must exceed x1 and y2 must exceed y1")
    return box
