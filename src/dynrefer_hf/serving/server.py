"""The LitServe API and server (see the package docstring)."""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import litserve
import torch

from ..pipelines.region_captioning import _region_controls
from .settings import API_PATH, RequestError, ServerSettings, parse_request

__all__ = ["DescribeAPI", "QueueLimit", "Segment", "build_server"]

logger = logging.getLogger("dynrefer_hf.serving")


def _error_response(status: int, reason: str, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"detail": reason}, status_code=status, headers=headers)


class Segment(NamedTuple):
    """Regions ``start:stop`` of the request at ``position`` of a LitServe batch, described in one forward pass."""

    position: int
    start: int
    stop: int


def _passes(items: list[tuple[int, dict]], max_regions: int) -> list[list[Segment]]:
    """The forward passes that describe ``items`` (``(position, request)``): requests with the same
    ``max_new_tokens`` share passes of at most ``max_regions`` regions, taken in order and packed full, so a
    request's regions may be split between two passes."""
    by_settings: dict[Any, list[tuple[int, dict]]] = {}
    for position, item in items:
        by_settings.setdefault(item["max_new_tokens"], []).append((position, item))
    passes: list[list[Segment]] = []
    for group in by_settings.values():
        current: list[Segment] = []
        room = max_regions
        for position, item in group:
            start, count = 0, len(item["boxes"])
            while start < count:
                if room == 0:
                    passes.append(current)
                    current, room = [], max_regions
                stop = min(count, start + room)
                current.append(Segment(position, start, stop))
                room -= stop - start
                start = stop
        passes.append(current)
    return passes


def _segment_controls(segments: list[tuple[Segment, dict]]) -> list | None:
    """The control words of every region of ``segments`` for the processor, or None when no request has any;
    a region without words gets ``[]``, whose prompt equals no words' ("|" then the predicted tags), as in the
    pipeline."""
    per_request = [_region_controls(item["controls"], len(item["boxes"])) for _, item in segments]
    if all(controls is None for controls in per_request):
        return None
    return [
        words
        for (segment, _), controls in zip(segments, per_request)
        for words in (controls[segment.start : segment.stop] if controls else [[]] * (segment.stop - segment.start))
    ]


class DescribeAPI(litserve.LitAPI):
    """The LitServe API: decodes each request on its own, describes a batch's regions in as few forward passes as
    its settings allow (regions of several requests packed together), answers each."""

    def __init__(self, settings: ServerSettings):
        super().__init__(
            max_batch_size=settings.max_batch_regions,  # at least one region per request
            batch_timeout=settings.max_wait_ms / 1000,
            api_path=API_PATH,
        )
        self.settings = settings
        self.describe = None

    def setup(self, device) -> None:
        from transformers import pipeline

        from ..precision import load_at_precision

        settings = self.settings
        device = settings.device or device
        # the command line's loader (`--dtype`, `--quantize`); `dynrefer serve` checked the folder before starting
        model, _, _ = load_at_precision(
            settings.model, device, settings.dtype, settings.quantize, revision=settings.revision
        )
        self.describe = pipeline(
            "region-captioning", model=model, processor=settings.model, revision=settings.revision, device=device,
            dtype=None,  # loaded at its precision above
        )
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    def decode_request(self, request: dict, **kwargs):  # dict: FastAPI parses the JSON body (or refuses it)
        try:
            return parse_request(request, self.settings)
        except RequestError as error:
            return error

    def batch(self, inputs):
        return inputs

    def predict(self, inputs, **kwargs):
        outputs: list[Any] = list(inputs)  # a RequestError stays as it is
        valid = [(position, item) for position, item in enumerate(inputs) if not isinstance(item, RequestError)]
        regions: dict[int, list[dict]] = {position: [] for position, _ in valid}
        passes = _passes(valid, self.settings.max_batch_regions)
        for segments in passes:
            described = self._describe([(segment, inputs[segment.position]) for segment in segments])
            for segment, records in zip(segments, described, strict=True):
                regions[segment.position].extend(records)
        for position, records in regions.items():
            outputs[position] = records
        logger.info(
            "batch of %d requests (%d regions, %d refused) in %d forward passes",
            len(inputs),
            sum(len(item["boxes"]) for _, item in valid),
            len(inputs) - len(valid),
            len(passes),
        )
        return outputs

    def _describe(self, segments: list[tuple[Segment, dict]]) -> list[list[dict]]:
        """The records of the regions of ``segments`` (of several images), from one forward pass: what the
        pipeline's ``_chunks``, ``_forward`` and ``postprocess`` do for one image, for all of them at once."""
        pipe = self.describe
        features = pipe.processor(
            images=[item["image"] for _, item in segments],
            boxes=[item["boxes"][segment.start : segment.stop] for segment, item in segments],
            controls=_segment_controls(segments),
            return_tensors="pt",
        )
        max_new_tokens = segments[0][1]["max_new_tokens"]  # the same in every segment of a pass
        generate_kwargs = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
        model_inputs = dict(features.to(pipe.device))
        model_inputs["pixel_values"] = model_inputs["pixel_values"].to(pipe.dtype)
        with torch.inference_mode():
            outputs = pipe.model.generate(
                **model_inputs,
                **pipe._prepare_generate_kwargs(generate_kwargs),  # the pipeline's defaults, as its `_forward`
            )
        return pipe.processor.post_process_region_captioning(outputs, features, pipe.model.config)

    def unbatch(self, output):
        return output

    def encode_response(self, output, **kwargs):
        if isinstance(output, RequestError):
            return _error_response(output.status, output.reason)
        return {"regions": output}


class QueueLimit:
    """ASGI middleware: at most ``max_queue`` describe requests in the server (waiting or running); more get
    503 with ``Retry-After`` at once, so a client never hangs on a full server."""

    def __init__(self, app, max_queue: int, retry_after_s: int = 1):
        self.app, self.max_queue, self.retry_after_s = app, max_queue, retry_after_s
        self.in_server = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != API_PATH:
            await self.app(scope, receive, send)
            return
        if self.in_server >= self.max_queue:
            response = _error_response(
                503, f"the server is full ({self.max_queue} requests in it); retry later", {"Retry-After": str(self.retry_after_s)}
            )
            await response(scope, receive, send)
            return
        self.in_server += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_server -= 1


def build_server(settings: ServerSettings) -> litserve.LitServer:
    """The LitServe server for ``settings``; ``.run(host=..., port=...)`` serves it."""
    from fastapi.exceptions import RequestValidationError

    server = litserve.LitServer(
        DescribeAPI(settings),
        accelerator="auto" if settings.device is None else ("cuda" if settings.device.startswith("cuda") else "cpu"),
        devices=1,
        workers_per_device=settings.workers,
        timeout=settings.timeout,
        max_payload_size=settings.max_body_bytes,
        middlewares=[(QueueLimit, {"max_queue": settings.max_queue})],
    )

    async def not_json(request, error):  # a body that is not JSON at all
        return _error_response(400, "the body must be a JSON object")

    server.app.add_exception_handler(RequestValidationError, not_json)
    return server
