"""``dynrefer serve``: the region-captioning pipeline behind HTTP, batching concurrent requests (docs/serving.md).

    dynrefer serve --model PATH --port 8000
    curl -s localhost:8000/v1/describe -d '{"image": "'$(base64 -w0 photo.jpg)'", "boxes": [[10, 20, 200, 180]]}'
"""

from __future__ import annotations

import argparse

from .common import add_model_loading_options, add_precision_options, count, number
from .errors import CommandError

__all__ = ["register"]


def register(subparsers) -> None:
    from ..serving import ServerSettings

    defaults = ServerSettings(model="")
    parser = subparsers.add_parser(
        "serve",
        help="serve the model over HTTP, batching concurrent requests (POST /v1/describe)",
        description=(
            "Serve the region-captioning pipeline over HTTP with LitServe: POST /v1/describe takes "
            "{'image': base64 PNG/JPEG, 'boxes': [[x1, y1, x2, y2], ...], 'controls', 'max_new_tokens'} and answers "
            "{'regions': [...]}; GET /health is 200 once the model is loaded. docs/serving.md."
        ),
    )
    parser.add_argument("--model", help="model folder or Hub id (default: the package's default model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    parser.add_argument("--port", type=count(1), default=8000, help="port (default: %(default)s)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument(
        "--max-batch-regions",
        type=count(1),
        default=defaults.max_batch_regions,
        help="regions per forward pass, of one or several requests (default: %(default)s)",
    )
    parser.add_argument(
        "--max-wait-ms",
        type=number(0.0),
        default=defaults.max_wait_ms,
        help="how long a request waits for others to batch with (default: %(default)s)",
    )
    parser.add_argument(
        "--max-queue",
        type=count(1),
        default=defaults.max_queue,
        help="requests in the server at most; more get 503 with Retry-After (default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=count(1),
        default=defaults.workers,
        help="model processes, each batching on its own (default: %(default)s); more use more cores and memory",
    )
    parser.add_argument(
        "--max-request-regions",
        type=count(1),
        default=defaults.max_request_regions,
        help="boxes per request at most; more get 413 (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=number(0.0, low_open=True),
        default=defaults.timeout,
        help="seconds a request may wait for the model before it gets 504 (default: %(default)s)",
    )
    parser.add_argument(
        "--allow-urls",
        action="store_true",
        help="fetch 'url' images (http and https only, size-capped); off by default: the server would make requests "
        "on its clients' behalf",
    )
    add_precision_options(parser)
    add_model_loading_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..serving import ServerSettings
    from .common import check_device, load_config, model_or_default

    try:
        from ..serving.server import build_server
    except ImportError:
        raise CommandError("dynrefer serve needs LitServe: pip install 'dynrefer_hf[serve]'") from None

    model, revision = model_or_default(args.model, args.quiet)
    load_config(model, revision)  # a clear error before the server starts its workers
    if args.max_wait_ms / 1000 >= args.timeout:
        raise CommandError(f"--max-wait-ms {args.max_wait_ms:g} must be shorter than --timeout {args.timeout:g} s")
    settings = ServerSettings(
        model=model,
        revision=revision,
        device=check_device(args.device),
        dtype=args.dtype,
        quantize=args.quantize,
        max_batch_regions=args.max_batch_regions,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        workers=args.workers,
        max_request_regions=args.max_request_regions,
        timeout=args.timeout,
        allow_urls=args.allow_urls,
    )
    build_server(settings).run(host=args.host, port=args.port, generate_client_file=False, num_api_servers=1)
    return 0
