"""The LitServe API and server (see the package docstring)."""

from __future__ import annotations

import logging
from typing import Any

import litserve

from .settings import API_PATH, RequestError, ServerSettings, parse_request

__all__ = ["DescribeAPI", "QueueLimit", "build_server"]

logger = logging.getLogger("dynrefer_hf.serving")


def _error_response(status: int, reason: str, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse({"detail": reason}, status_code=status, headers=headers)


def _groups(items: list[tuple[int, dict]], max_regions: int) -> list[list[tuple[int, dict]]]:
    """Consecutive runs of requests with the same ``max_new_tokens`` holding at most ``max_regions`` regions (a
    larger request alone): one pipeline call each."""
    groups: list[list[tuple[int, dict]]] = []
    for position, item in items:
        last = groups[-1] if groups else None
        if (
            last is not None
            and last[0][1]["max_new_tokens"] == item["max_new_tokens"]
            and sum(len(other["boxes"]) for _, other in last) + len(item["boxes"]) <= max_regions
        ):
            last.append((position, item))
        else:
            groups.append([(position, item)])
    return groups


class DescribeAPI(litserve.LitAPI):
    """The LitServe API: decodes each request on its own, describes a batch with the pipeline, answers each."""

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

        import dynrefer_hf

        dynrefer_hf.register()
        self.describe = pipeline(
            "region-captioning", model=self.settings.model, revision=self.settings.revision, device=self.settings.device or device
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
        for group in _groups(valid, self.settings.max_batch_regions):
            max_new_tokens = group[0][1]["max_new_tokens"]
            pipeline_inputs = [
                {key: item[key] for key in ("image", "boxes", "controls") if item[key] is not None} for _, item in group
            ]
            results = self.describe(
                pipeline_inputs,
                batch_size=self.settings.max_batch_regions,
                **({} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}),
            )
            for (position, _), regions in zip(group, results, strict=True):
                outputs[position] = regions
        logger.info(
            "batch of %d requests (%d regions, %d refused) in %d pipeline calls",
            len(inputs),
            sum(len(item["boxes"]) for _, item in valid),
            len(inputs) - len(valid),
            len(_groups(valid, self.settings.max_batch_regions)),
        )
        return outputs

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
