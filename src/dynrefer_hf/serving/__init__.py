"""An HTTP server for the ``region-captioning`` pipeline that batches concurrent requests (``dynrefer serve``,
docs/serving.md), on LitServe's dynamic batching.

``POST /v1/describe`` takes ``{"image": base64 PNG/JPEG | "url": ..., "boxes": [[x1, y1, x2, y2], ...],
"controls": optional, "max_new_tokens": optional}`` and answers ``{"regions": [records]}``, the records exactly
as the pipeline returns them for that image alone. Requests arriving within ``max_wait_ms`` of each other are
gathered, and their regions are described together: requests with the same ``max_new_tokens`` share forward
passes of up to ``max_batch_regions`` regions of several images (``processor(images=[...], boxes=[...])``,
``model.generate``, ``processor.post_process_region_captioning``, as the pipeline does for one image); each answer
is cut back out by position. Each request is checked on its own: a bad one gets its 400/413/422 and one-line reason
without touching the others of its batch. Past ``max_queue`` requests in the server, new ones get 503 with
``Retry-After``; a request that waits longer than ``timeout`` seconds for the model gets 504.
"""

from .settings import API_PATH, RequestError, ServerSettings, parse_request

__all__ = ["API_PATH", "DescribeAPI", "RequestError", "ServerSettings", "build_server", "parse_request"]


def __getattr__(name):
    # the LitServe side is imported when asked for: LitServe (and torch) take seconds to import
    if name in ("DescribeAPI", "build_server"):
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
