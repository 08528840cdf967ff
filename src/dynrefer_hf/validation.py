"""Argument checks shared by every public boundary: processor, pipeline, config, converter and CLI.

Parsing of command-line text lives in ``cli/``; reading images in ``images.py``.

Each check raises before any work starts, with a message naming the argument, the value and what is
allowed (docs/reliability.md lists the rules): ``TypeError`` for a value of the wrong type,
``ValueError`` for a value of the right type outside its range or inconsistent with another one.
The command line turns both into one line on stderr and exit status 2.

This module imports only NumPy and the view geometry, so the ``dynrefer`` command can use it before
torch is loaded.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .views import crop_boxes_from_view_boxes, widen_degenerate_box

__all__ = [
    "binary_masks",
    "check_bool",
    "check_count",
    "check_model_folder",
    "check_number",
    "check_probability",
    "check_top_k",
    "check_weight_shapes",
    "checked_region_box",
    "number_range_text",
]

def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_bool(name: str, value: Any, allow_none: bool = False) -> bool | None:
    """``value`` if it is ``True``/``False`` (or ``None`` when allowed); ``TypeError`` otherwise."""
    if value is None and allow_none:
        return None
    if not isinstance(value, (bool, np.bool_)):
        allowed = "True, False or None" if allow_none else "True or False"
        raise TypeError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    return bool(value)


def check_count(name: str, value: Any, minimum: int = 1, allow_none: bool = False) -> int | None:
    """``value`` as an ``int`` >= ``minimum`` (``bool`` is not a count)."""
    if value is None and allow_none:
        return None
    if not _is_integer(value):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    allow_none: bool = False,
) -> float | None:
    """``value`` as a finite ``float`` in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    if value is None and allow_none:
        return None
    allowed = number_range_text(low, high, low_open)
    if not _is_real(value):
        raise TypeError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__})")
    number = float(value)
    too_low = low is not None and (number <= low if low_open else number < low)
    if not math.isfinite(number) or too_low or (high is not None and number > high):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return number


def number_range_text(low: float | None = None, high: float | None = None, low_open: bool = False) -> str:
    """What `check_number` accepts, in words: ``"a number in [0, 1]"``."""
    if low is None and high is None:
        return "a finite number"
    left = "(" if low_open else "["
    low_text = "-inf" if low is None else f"{low:g}"
    high_text = "inf" if high is None else f"{high:g}"
    return f"a number in {left}{low_text}, {high_text}]"


def check_probability(name: str, value: Any, allow_none: bool = False) -> float | None:
    """``value`` as a ``float`` in [0, 1]."""
    return check_number(name, value, 0.0, 1.0, allow_none=allow_none)


def check_top_k(name: str, value: Any) -> int | None:
    """``None`` (keep all) or an ``int`` >= 0 (keep the ``value`` best). Negative values are refused rather
    than read as Python's "all but the last k"."""
    if value is None:
        return None
    if not _is_integer(value):
        raise TypeError(
            f"{name} must be an integer >= 0 or None (all), got {value!r} ({type(value).__name__})"
        )
    if value < 0:
        raise ValueError(f"{name} must be an integer >= 0 or None (all), got {value}")
    return int(value)


def binary_masks(masks: Any, name: str = "masks") -> np.ndarray:
    """``masks`` as a boolean array; refused unless they are binary: ``False``/``True``, 0/1, or integers
    taking 0 and one other positive value (0/255, as SAM masks and mask PNGs are saved), whose non-zero
    pixels are the region, as torchvision's ``masks_to_boxes`` reads masks.

    Soft (probability) masks, masks holding NaN and integer masks with several non-zero values (label maps)
    are refused, not thresholded: ``astype(bool)`` would turn every non-zero probability, and NaN, into a
    mask pixel. Threshold them yourself (``masks > 0.5``).
    """
    if hasattr(masks, "detach"):  # a torch tensor
        masks = masks.detach().cpu().numpy()
    try:
        array = np.asarray(masks)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{name} must be a boolean or 0/1 array [N, H, W] (ragged lists are not): {error}"
        ) from None
    if array.dtype == bool:
        return array
    if array.dtype.kind not in "iuf":
        raise TypeError(f"{name} must be a boolean or 0/1 numeric array, got dtype {array.dtype}")
    if array.dtype.kind == "f" and np.isnan(array).any():
        raise ValueError(f"{name} contain NaN: masks must be binary (0/1 or boolean)")
    if array.dtype.kind in "iu":
        foreground = array[array != 0]
        if not foreground.size or (foreground.flat[0] > 0 and (foreground == foreground.flat[0]).all()):
            return array != 0
    elif not array.size or np.isin(array, (0, 1)).all():
        return array.astype(bool)
    low, high = array.min(), array.max()
    raise ValueError(
        f"{name} must be binary (boolean, 0/1, or 0 and one other positive integer such as 0/255), got values "
        f"from {low:g} to {high:g}; threshold soft masks yourself, e.g. `masks > 0.5`"
    )


def checked_region_box(box: Sequence[float], width: int, height: int, where: str = "box") -> np.ndarray:
    """A region box ``(x1, y1, x2, y2)`` in pixels of a ``width`` x ``height`` image, as the model uses it.

    The one box rule of the processor, the pipeline and the command line:

    * four finite numbers with ``x1 <= x2`` and ``y1 <= y2``, else ``ValueError``;
    * boxes at most one pixel wide or high (zero area included) are widened to one pixel (upstream's
      polygon rule, docs/upstream/views.md §1);
    * boxes partly outside the image (negative coordinates included) are kept as given for the view
      interpolation and clipped to the image for the crops, as upstream;
    * a box that covers no pixel of the image is refused (``ValueError``).

    Returns the (possibly widened) box as float64 ``[4]``.
    """
    array = np.asarray(box, dtype=np.float64).reshape(-1)
    where = f"{where} {array.tolist()}"
    if array.shape != (4,):
        raise ValueError(f"{where}: a box is four numbers x1, y1, x2, y2")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{where}: box coordinates must be finite (no NaN or inf)")
    if array[2] < array[0] or array[3] < array[1]:
        raise ValueError(f"{where}: need x1 <= x2 and y1 <= y2 (boxes are (x1, y1, x2, y2))")
    widened = np.array(widen_degenerate_box(array, width, height))
    x1, y1, x2, y2 = crop_boxes_from_view_boxes(widened, width, height).tolist()
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"{where}: the box covers no pixel of the {width}x{height} image")
    return widened


_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_model_folder(folder: str | os.PathLike, model_type: str = "dynrefer") -> None:
    """Refuse a local model folder broken in the usual ways, before anything is built from it.

    Checks that ``folder`` holds a ``config.json`` that is a JSON object of ``model_type``, and weights
    (``model.safetensors``, sharded or not, or ``pytorch_model.bin``) whose safetensors headers are readable.
    Does nothing for a name that is not a local folder (a Hub id).

    Raises:
        FileNotFoundError: no ``config.json``, no weights, or a shard named by the index that is absent.
        ValueError: a ``config.json`` that is not JSON, has no or another ``model_type``, or a corrupt or
            truncated weights file.
    """
    if not os.path.isdir(folder):
        return
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        content = (
            "it is empty"
            if not os.listdir(folder)
            else f"it holds {', '.join(sorted(os.listdir(folder))[:6])}"
        )
        raise FileNotFoundError(
            f"{folder} is not a saved model folder: it has no config.json ({content}); save_pretrained writes "
            "config.json and model.safetensors"
        )
    try:
        with open(config_file, encoding="utf-8") as file:
            config = json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_file} is not a readable JSON file: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} must hold a JSON object, got {type(config).__name__}")  # noqa: TRY004
    found = config.get("model_type")
    if found != model_type:
        what = "has no model_type" if found is None else f"is a {found!r} model"
        raise ValueError(f"{folder} {what}, not a {model_type!r} model (config.json model_type)")
    weights = [name for name in _WEIGHT_FILES if os.path.isfile(os.path.join(folder, name))]
    if not weights:
        raise FileNotFoundError(
            f"{folder} has a config.json but no weights (expected one of {', '.join(_WEIGHT_FILES)})"
        )
    if weights[0] == "model.safetensors":
        _check_safetensors(os.path.join(folder, "model.safetensors"))
    elif weights[0] == "model.safetensors.index.json":
        index_file = os.path.join(folder, weights[0])
        try:
            with open(index_file, encoding="utf-8") as file:
                shards = sorted(set(json.load(file)["weight_map"].values()))
        except (
            OSError,
            UnicodeDecodeError,
            json.JSONDecodeError,
            KeyError,
            TypeError,
            AttributeError,
        ) as error:
            raise ValueError(f"{index_file} is not a readable safetensors index: {error!r}") from None
        for shard in shards:
            path = os.path.join(folder, shard)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}, named by {index_file}, is missing")
            _check_safetensors(path)


def _safetensors_files(folder: str | os.PathLike) -> list[str]:
    """The safetensors files of a saved model folder (one, or the shards of its index); [] for other formats."""
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    index_file = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.isfile(index_file):
        return []
    with open(index_file, encoding="utf-8") as file:
        return [os.path.join(folder, shard) for shard in sorted(set(json.load(file)["weight_map"].values()))]


def check_weight_shapes(folder: str | os.PathLike, expected: dict[str, tuple[int, ...]]) -> None:
    """Refuse a folder whose safetensors weights do not have the shapes its config implies (``expected``:
    name -> shape, e.g. from the model built on the meta device), reading only the file headers.

    A ``config.json`` that lost its sub-configs would otherwise make ``from_pretrained`` build (and
    initialise) the full-size released architecture around small weights before failing.

    Raises:
        ValueError: naming the first mismatched tensors, with both shapes.
    """
    from safetensors import safe_open

    mismatched = []
    for path in _safetensors_files(folder):
        with safe_open(path, framework="np") as file:
            for name in file.keys():  # noqa: SIM118 - a safe_open handle, not a dict
                shape = tuple(file.get_slice(name).get_shape())
                if name in expected and tuple(expected[name]) != shape:
                    mismatched.append(f"{name} {list(shape)} (config: {list(expected[name])})")
    if mismatched:
        shown = "; ".join(mismatched[:3]) + (
            f"; and {len(mismatched) - 3} more" if len(mismatched) > 3 else ""
        )
        raise ValueError(
            f"the weights in {folder} do not fit its config.json ({len(mismatched)} tensor(s) of other shapes: "
            f"{shown}): the config is incomplete or belongs to other weights"
        )


def _check_safetensors(path: str) -> None:
    """Read the header of a safetensors file (safetensors also checks that the file holds every byte it
    describes); a corrupt or truncated file raises ``ValueError``."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="np") as file:
            file.keys()
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is corrupt or truncated: {error}") from None
