"""Helpers shared by the subcommands: loading models with one-sentence errors, parsing boxes, the
demonstration-model notice."""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any

from ..validation import check_count, check_model_folder, check_number, number_range_text
from .errors import CommandError

__all__ = [
    "add_model_loading_options",
    "add_precision_options",
    "check_device",
    "count",
    "load_config",
    "load_region_captioner",
    "load_region_captioner_from_options",
    "model_or_default",
    "number",
    "parse_box",
    "parse_point",
]


def _unavailable(model: str, error: Exception) -> CommandError:
    """The user-facing error for a model that could not be loaded."""
    if os.path.isdir(model):
        return CommandError(f"cannot load the model folder {model}: {str(error).splitlines()[0]}")
    return CommandError(
        f"model {model!r} is neither a local folder nor in the Hugging Face cache and could not be downloaded; "
        f"get its weights on a machine with network access (`hf download {model}`, then copy the cache or the "
        "folder here) and pass --model PATH_TO_THE_FOLDER."
    )


def add_model_loading_options(parser: argparse.ArgumentParser) -> None:
    """``--allow-missing-weights`` and ``--quiet``, for commands that load a model."""
    parser.add_argument(
        "--allow-missing-weights",
        action="store_true",
        help="use a checkpoint that lacks some of the model's tensors (they are random; refused by default)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no notice when the embedded demonstration model is used, nor of the precision chosen",
    )


def add_precision_options(parser: argparse.ArgumentParser) -> None:
    """``--dtype`` (default ``auto``: the machine's precision, `dynrefer_hf.precision`) and ``--quantize``."""
    from ..precision import PRECISIONS, QUANTIZATIONS

    parser.add_argument(
        "--dtype",
        choices=PRECISIONS,
        default="auto",
        help="precision: auto (default: bfloat16 on CPUs with AMX/AVX512-BF16, upstream's on CUDA, else float32), "
        "float32, bfloat16, float16, or upstream (Flan-T5 bfloat16, the rest float32)",
    )
    parser.add_argument(
        "--quantize", choices=QUANTIZATIONS, help="int8: torchao int8 weights (less memory, slightly lower quality)"
    )


def load_model(model: str, device: str, dtype: str = "auto", quantize: str | None = None, quiet: bool = False, **kwargs):
    """``DynReferForRegionCaptioning.from_pretrained(model)`` at the precision ``dtype`` names (``"auto"``: the
    machine's), loaded straight into it, on ``device`` (`precision.load_at_precision`); says on stderr which
    precision it chose (unless ``quiet``)."""
    from ..precision import describe_choice, load_at_precision

    try:
        loaded, chosen, why = load_at_precision(model, device, dtype, quantize, **kwargs)
    except ImportError as error:  # --quantize without torchao
        raise CommandError(f"--quantize {quantize}: {error}") from None
    if not quiet:  # once loaded: a folder that fails to load gets its one-line error alone
        print(describe_choice(chosen, why, quantize), file=sys.stderr)
    return loaded


def model_or_default(model: str | None, quiet: bool = False) -> tuple[str, str | None]:
    """``(model, revision)``: ``model``, or the package's default model with a one-line notice on stderr
    that it is the demonstration model (unless ``quiet``)."""
    if model:
        return model, None
    from ..pipelines.region_captioning import DEFAULT_MODEL, DEMO_MODEL_NOTICE, _is_demo_model

    if not quiet and _is_demo_model(DEFAULT_MODEL.name_or_path):
        print(
            f"dynrefer: note: {DEMO_MODEL_NOTICE} (--model to choose one, --quiet to hide this)",
            file=sys.stderr,
        )
    return DEFAULT_MODEL


def load_config(model: str, revision: str | None = None):
    """The ``DynReferConfig`` of ``model`` (a folder or a Hub id)."""
    from transformers import AutoConfig

    try:
        check_model_folder(model)
        config = AutoConfig.from_pretrained(model, revision=revision)
    except (OSError, ValueError) as error:
        if isinstance(error, FileNotFoundError) or (isinstance(error, ValueError) and os.path.isdir(model)):
            raise CommandError(str(error)) from None
        raise _unavailable(model, error) from None
    if config.model_type != "dynrefer":
        raise CommandError(f"{model} is a {config.model_type!r} model, not a DynRefer model")
    return config


def check_device(device: str | None) -> str:
    """``device`` (default: cuda when available, else cpu), refused when it does not exist here."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise CommandError(f"--device {device} is not a device: use cpu, cuda, cuda:1, mps, ...") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: no CUDA device is available here; use --device cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise CommandError(f"--device {device}: no MPS device is available here; use --device cpu")
    return device


def load_region_captioner(
    model: str,
    revision: str | None = None,
    device: str | None = None,
    dtype: str = "auto",
    allow_missing_weights: bool = False,
    quantize: str | None = None,
    quiet: bool = False,
):
    """The ``region-captioning`` pipeline for ``model`` on ``device`` (default: CUDA when available).

    A model folder broken in the usual ways (empty, no weights, corrupt weights, a config that is not
    JSON, incomplete or of another model type) or lacking some of the model's tensors (unless
    ``allow_missing_weights``) is a `CommandError`, one sentence, before anything large is built. ``dtype`` and
    ``quantize`` are `add_precision_options`' (`load_model`).
    """
    from transformers import pipeline
    from transformers.utils import logging as transformers_logging

    from ..pipelines.region_captioning import logger as pipeline_logger

    load_config(model, revision)  # a clear error before the pipeline factory tries anything else
    device = check_device(device)
    verbosity = transformers_logging.get_verbosity()
    # transformers' load report (missing / mismatched tensors) would repeat, as a table, what the one-line
    # error below says; the command refuses such checkpoints anyway
    transformers_logging.set_verbosity_error()
    try:
        loaded = load_model(model, device, dtype, quantize, quiet, revision=revision)
    except ValueError as error:
        if os.path.isdir(model):  # the folder's own problem, named by `from_pretrained`
            raise CommandError(str(error)) from None
        raise _unavailable(model, error) from None
    except OSError as error:
        raise _unavailable(model, error) from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    level = pipeline_logger.level
    pipeline_logger.setLevel("ERROR")  # the command prints the demonstration-model notice itself
    try:
        return pipeline(
            "region-captioning",
            model=loaded,
            processor=model,
            revision=revision,
            device=device,
            dtype=None,  # loaded at its precision above
            allow_missing_weights=allow_missing_weights,
        )
    except ValueError as error:
        message = str(error)
        if "allow_missing_weights" in message:
            message = message.replace("pass allow_missing_weights=True", "pass --allow-missing-weights")
            raise CommandError(message) from None
        raise _unavailable(model, error) from None
    except OSError as error:
        raise _unavailable(model, error) from None
    finally:
        pipeline_logger.setLevel(level)


def load_region_captioner_from_options(args) -> tuple[Any, str]:
    """``(pipeline, model name)`` for the options of `add_model_loading_options` and `add_precision_options`
    (``--model``, ``--device``, ``--dtype``, ``--quantize``, ``--allow-missing-weights``, ``--quiet``), which
    every command that describes regions shares."""
    model, revision = model_or_default(args.model, args.quiet)
    describe = load_region_captioner(
        model,
        revision=revision,
        device=args.device,
        dtype=args.dtype,
        allow_missing_weights=args.allow_missing_weights,
        quantize=args.quantize,
        quiet=args.quiet,
    )
    return describe, model


def parse_box(text: str) -> list[float]:
    """An argparse ``type``: ``"x1,y1,x2,y2"`` (pixels, spaces allowed) as four finite floats with x1 <= x2
    and y1 <= y2; whether the box covers pixels of the image is checked once the image is read
    (``validation.checked_region_box``)."""
    try:
        box = [float(part) for part in text.replace(" ", "").split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        problem = "expected four numbers x1,y1,x2,y2"
    elif not all(math.isfinite(value) for value in box):
        problem = "the coordinates must be finite numbers"
    elif box[2] < box[0] or box[3] < box[1]:
        problem = "need x1 <= x2 and y1 <= y2"
    else:
        return box
    raise argparse.ArgumentTypeError(f"{text!r} is not a box: {problem}")


def parse_point(text: str) -> list[float]:
    """``"x,y"`` (pixels) as two finite floats; whether it is on the image is checked once the image is read."""
    try:
        point = [float(part) for part in text.split(",")]
    except ValueError:
        point = []
    if len(point) != 2 or not all(math.isfinite(value) for value in point):
        raise argparse.ArgumentTypeError(f"{text!r} is not a point: write x,y (pixels)")
    return point


def count(minimum: int = 1):
    """An argparse ``type``: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            return check_count("the value", int(text), minimum)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {minimum}") from None

    return parse


def number(low: float | None = None, high: float | None = None, low_open: bool = False):
    """An argparse ``type``: a finite number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""

    def parse(text: str) -> float:
        try:
            return check_number("the value", float(text), low, high, low_open=low_open)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {number_range_text(low, high, low_open)}"
            ) from None

    return parse
