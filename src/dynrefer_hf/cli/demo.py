"""``dynrefer demo``: start the web demo (docs/demo.md) on a local address.

Needs the ``[demo]`` extra (Gradio); without it the command says what to install and exits with status 2.
"""

from __future__ import annotations

import argparse

from .common import add_model_loading_options
from .errors import CommandError

__all__ = ["register"]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="start the web demo: draw boxes on a picture in the browser and read their descriptions",
        description=(
            "Start the web demo (a Gradio app, needs the [demo] extra): upload a picture, draw boxes on it "
            "and read the caption, tags, attributes and class of every region."
        ),
    )
    parser.add_argument("--model", help="model folder or Hub id (default: the package's default model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default: %(default)s)")
    parser.add_argument(
        "--share",
        choices=("no", "yes"),
        default="no",
        help="also serve through a public gradio.live link (needs network; default: %(default)s)",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    add_model_loading_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .common import load_region_captioner, model_or_default

    if not 0 < args.port < 65536:
        raise CommandError(f"--port must be between 1 and 65535, got {args.port}")
    try:
        from ..app import LAUNCH_OPTIONS, build_demo
    except ImportError as error:
        raise CommandError(str(error)) from None
    model, revision = model_or_default(args.model, args.quiet)
    describe = load_region_captioner(
        model, revision=revision, device=args.device, allow_missing_weights=args.allow_missing_weights
    )
    demo = build_demo(describe)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share == "yes", **LAUNCH_OPTIONS)
    except OSError as error:
        raise CommandError(f"cannot serve on {args.host}:{args.port}: {error}") from None
    return 0
