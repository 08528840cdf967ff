"""Images in: the one rule that turns a file, a URL, a PIL image or an array into the RGB pixels DynRefer sees.

The pipeline, the processor, the command line and the web demo all read pixels through here, so a 16-bit
picture, a grey one or a picture with alpha becomes the same RGB image whichever door it comes in by:

* 8-bit PIL modes (L, P, RGBA, CMYK, YCbCr, ...) are converted with ``convert("RGB")``, as upstream does
  after ``Image.open``: the alpha channel is dropped, not composited;
* 16-bit pixels (PIL modes ``I;16*``, ``uint16`` arrays) are rescaled to 8 bits (``round(x * 255 / 65535)``),
  not clipped to white as ``convert("RGB")`` would;
* 32-bit integer and float pixels (PIL modes ``I``, ``F``, other array dtypes) are refused: their range is
  unknown.

This module imports no torch, so the ``dynrefer`` command can read a picture before loading a model.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from io import BytesIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .validation import check_number

__all__ = ["DEFAULT_DOWNLOAD_TIMEOUT", "ImageInput", "load_rgb_image", "to_rgb_array"]

DEFAULT_DOWNLOAD_TIMEOUT = 30.0
"""Seconds an image download may wait for the server (connect and each read) before it fails."""

ImageInput = str | os.PathLike | Image.Image | np.ndarray

# PIL modes of 16-bit unsigned pixels: rescaled to 8 bits (x * 255 / 65535, rounded), not clipped.
_UINT16_PIL_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# PIL modes whose range is unknown (32-bit integers, floats): refused, not guessed.
_WIDE_PIL_MODES = ("I", "F")


def _uint16_to_uint8(array: np.ndarray) -> np.ndarray:
    """Full-range 16-bit values as 8-bit ones: ``round(x * 255 / 65535)`` (0 -> 0, 65535 -> 255)."""
    return ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An image as a C-contiguous ``[H, W, 3]`` uint8 RGB array.

    The module's rule (above). Arrays may be ``[H, W]`` (grey), ``[H, W, 1]``, ``[H, W, 3]`` or
    ``[H, W, 4]`` (alpha dropped).

    Raises:
        ValueError: for 32-bit or float images (their range is unknown: convert them to 8 bits yourself),
            empty images, or arrays of another shape.
        TypeError: for anything that is not a PIL image or a NumPy array.
    """
    if isinstance(image, Image.Image):
        if image.mode in _WIDE_PIL_MODES:
            raise ValueError(
                f"PIL images of mode {image.mode!r} (32-bit integer or float pixels) are not supported: their "
                "range is unknown, so convert them to 8-bit RGB first (Image.convert('RGB') would clip the values)"
            )
        if image.mode in _UINT16_PIL_MODES:
            array = np.asarray(image).astype(np.uint16)
        else:
            array = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise TypeError(f"images must be PIL images or NumPy uint8/uint16 arrays, got {type(image).__name__}")
    if array.dtype == np.uint16:
        array = _uint16_to_uint8(array)
    elif array.dtype != np.uint8:
        raise ValueError(
            f"image arrays must be uint8 (or uint16) RGB, got dtype {array.dtype}: the range of other types is "
            "unknown, so convert to 8 bits first (e.g. (x * 255).round().astype(np.uint8) for floats in [0, 1])"
        )
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    elif array.ndim == 3 and array.shape[2] in (1, 3, 4):
        array = np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[:, :, :3]
    else:
        raise ValueError(
            f"image arrays must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got shape {list(array.shape)}"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"the image is empty ({array.shape[1]}x{array.shape[0]} pixels)")
    return np.ascontiguousarray(array)


def load_rgb_image(
    image: ImageInput, timeout: float | None = DEFAULT_DOWNLOAD_TIMEOUT, exif_orientation: bool = True
) -> Image.Image:
    """An RGB PIL image from a local path, an ``http(s)`` URL, a PIL image or a NumPy array.

    NumPy arrays are ``uint8`` or ``uint16`` ``[H, W]`` (grey) or ``[H, W, 1|3|4]``; 16-bit images are
    rescaled to 8 bits, 32-bit and float images refused (``to_rgb_array``).

    Args:
        timeout: seconds a download may wait for the server (connect and each read); ``None`` waits forever.
        exif_orientation: for files and downloads, turn the image as its EXIF orientation tag says, as
            photo viewers and annotation tools show it (default). ``False`` keeps the stored pixel order,
            as upstream's ``Image.open(path).convert("RGB")`` does. PIL images and arrays are used as given.

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: a file or download that is not a readable image (truncated, not an image, larger than
            PIL's decompression-bomb limit ``Image.MAX_IMAGE_PIXELS``), a download that failed or timed
            out, a 32-bit/float image, or an array of the wrong shape.
        TypeError: anything else than a path, URL, PIL image or array.
    """
    if isinstance(image, (Image.Image, np.ndarray)):
        return Image.fromarray(to_rgb_array(image))
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(
            f"an image must be a path, a URL, a PIL image or a NumPy array, got {type(image).__name__}"
        )
    check_number("timeout", timeout, 0.0, low_open=True, allow_none=True)
    source = os.fspath(image)
    if source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=timeout) as response:
                content = response.read()
        except (urllib.error.URLError, OSError) as error:  # TimeoutError and socket errors are OSErrors
            raise ValueError(
                f"could not download the image {source}: {getattr(error, 'reason', error)} (timeout {timeout} s)"
            ) from error
        return _open_image(BytesIO(content), source, exif_orientation)
    if os.path.isdir(source):
        raise ValueError(f"{source} is a folder, not an image file")
    if not os.path.isfile(source):
        raise FileNotFoundError(f"image file not found: {source}")
    return _open_image(source, source, exif_orientation)


def _open_image(file, name: str, exif_orientation: bool) -> Image.Image:
    try:
        with Image.open(file) as opened:
            opened.load()
            turned = ImageOps.exif_transpose(opened) if exif_orientation else opened
            return Image.fromarray(to_rgb_array(turned))
    except Image.DecompressionBombError as error:
        raise ValueError(
            f"{name} is not a readable image: {error} (raise Image.MAX_IMAGE_PIXELS if you trust the file)"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, EOFError) as error:
        raise ValueError(f"{name} is not a readable image ({error})") from None
