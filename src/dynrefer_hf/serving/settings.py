"""The server's settings and its check of one request (light imports, so ``dynrefer --help`` stays fast)."""

from __future__ import annotations

import base64
import binascii
import json
import math
import urllib.error
import urllib.request
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import PIL.Image
import PIL.ImageOps

__all__ = ["API_PATH", "RequestError", "ServerSettings", "parse_request"]

API_PATH = "/v1/describe"
_REQUEST_KEYS = {"image", "url", "boxes", "controls", "max_new_tokens"}
IMAGE_FORMATS = ("PNG", "JPEG")


@dataclass(frozen=True)
class ServerSettings:
    """What ``dynrefer serve`` can set (docs/serving.md explains each)."""

    model: str
    revision: str | None = None
    device: str | None = None
    dtype: str = "auto"  # `dynrefer_hf.precision`: the machine's precision by default
    quantize: str | None = None
    max_batch_regions: int = 64
    max_wait_ms: float = 20.0
    max_queue: int = 256
    workers: int = 1
    max_request_regions: int = 64
    max_new_tokens: int = 64
    max_body_bytes: int = 20 * 2**20
    max_image_pixels: int = 4096 * 4096
    timeout: float = 60.0
    allow_urls: bool = False
    url_timeout: float = 10.0


class RequestError(Exception):
    """A client's mistake: answered with ``status`` and a one-line ``reason``."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def _image_from_bytes(content: bytes, settings: ServerSettings, where: str) -> PIL.Image.Image:
    try:
        with PIL.Image.open(BytesIO(content), formats=IMAGE_FORMATS) as opened:
            if opened.width * opened.height > settings.max_image_pixels:
                raise RequestError(
                    413, f"{where}: the image is {opened.width}x{opened.height}, over {settings.max_image_pixels} pixels"
                )
            # turned as its EXIF orientation says, as the pipeline does for files and downloads
            return PIL.ImageOps.exif_transpose(opened).convert("RGB")
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as error:
        raise RequestError(400, f"{where}: not a readable PNG or JPEG image ({error})") from None


def _fetch(url: str, settings: ServerSettings) -> PIL.Image.Image:
    """An http(s) image, read up to the body size limit (only when the server allows URLs)."""
    if not settings.allow_urls:
        raise RequestError(422, "url: this server does not fetch images (start it with --allow-urls); send 'image'")
    if not url.startswith(("http://", "https://")):
        raise RequestError(422, f"url: only http:// and https:// are fetched, got {url[:80]!r}")
    try:
        with urllib.request.urlopen(url, timeout=settings.url_timeout) as response:
            content = response.read(settings.max_body_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise RequestError(422, f"url: could not fetch {url[:80]!r} ({getattr(error, 'reason', error)})") from None
    if len(content) > settings.max_body_bytes:
        raise RequestError(413, f"url: the image is over {settings.max_body_bytes} bytes")
    return _image_from_bytes(content, settings, "url")


def _check_controls(controls: Any, num_regions: int) -> None:
    def words(value) -> bool:
        return isinstance(value, str) or (isinstance(value, list) and all(isinstance(word, str) for word in value))

    if controls is None or words(controls):
        return
    if isinstance(controls, list) and len(controls) == num_regions and all(words(item) for item in controls):
        return
    raise RequestError(
        422,
        "controls: give a comma-separated string or a list of words for every region, or a list with one of "
        f"those per region ({num_regions})",
    )


def parse_request(request: Any, settings: ServerSettings) -> dict:
    """One request's pipeline input ``{"image", "boxes", "controls", "max_new_tokens"}``; `RequestError` otherwise."""
    from ..validation import checked_region_box

    if not isinstance(request, dict):
        raise RequestError(400, "the body must be a JSON object")
    unknown = sorted(set(request) - _REQUEST_KEYS)
    if unknown:
        raise RequestError(422, f"{unknown[0]}: not a known field ({', '.join(sorted(_REQUEST_KEYS))})")
    if ("image" in request) == ("url" in request):
        raise RequestError(422, "give the image either as 'image' (base64 PNG/JPEG) or as 'url', exactly one")
    boxes = request.get("boxes")
    if not isinstance(boxes, list) or not boxes:
        raise RequestError(422, "boxes: give a non-empty list of [x1, y1, x2, y2] boxes (pixels)")
    if len(boxes) > settings.max_request_regions:
        raise RequestError(413, f"boxes: {len(boxes)} regions, over this server's {settings.max_request_regions} per request")
    for index, box in enumerate(boxes):
        if not (
            isinstance(box, list)
            and len(box) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
        ):
            raise RequestError(422, f"boxes[{index}]: {json.dumps(box)[:80]} is not 4 finite numbers [x1, y1, x2, y2]")
    max_new_tokens = request.get("max_new_tokens")
    if max_new_tokens is not None and not (
        isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool) and 1 <= max_new_tokens <= settings.max_new_tokens
    ):
        raise RequestError(422, f"max_new_tokens: {max_new_tokens!r} is not an integer in [1, {settings.max_new_tokens}]")
    _check_controls(request.get("controls"), len(boxes))
    if "image" in request:
        if not isinstance(request["image"], str):
            raise RequestError(400, "image: give the image file's bytes as a base64 string")
        try:
            content = base64.b64decode(request["image"], validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(400, "image: not valid base64") from None
        image = _image_from_bytes(content, settings, "image")
    else:
        if not isinstance(request["url"], str):
            raise RequestError(422, "url: must be a string")
        image = _fetch(request["url"], settings)
    for index, box in enumerate(boxes):
        try:
            checked_region_box(box, image.width, image.height, where=f"boxes[{index}]")
        except ValueError as error:
            raise RequestError(422, str(error)) from None
    return {"image": image, "boxes": boxes, "controls": request.get("controls"), "max_new_tokens": max_new_tokens}
