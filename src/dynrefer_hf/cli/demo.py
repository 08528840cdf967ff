"""``dynrefer demo``: start the web demo (docs/demo.md) on a local address.

Needs the ``[demo]`` extra (Gradio); without it the command says what to install and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from .common import add_model_loading_options, add_precision_options
from .errors import CommandError

__all__ = ["register"]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="start the web demo: draw boxes (or click objects) on a picture in the browser, read their descriptions",
        description=(
            "Start the web demo (a Gradio app, needs the [demo] extra): upload a picture, draw boxes on it "
            "(or click on objects, with --segmenter) and read the caption, tags, attributes and class of every "
            "region."
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
    parser.add_argument(
        "--segmenter",
        metavar="MODEL",
        help="SAM / SAM 2 folder or Hub id (e.g. facebook/sam-vit-base): turns on clicking on objects",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    add_precision_options(parser)
    add_model_loading_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .common import load_region_captioner_from_options

    if not 0 < args.port < 65536:
        raise CommandError(f"--port must be between 1 and 65535, got {args.port}")
    try:
        from ..app import LAUNCH_OPTIONS, build_demo
    except ImportError as error:
        raise CommandError(str(error)) from None
    if args.segmenter is not None:  # a wrong segmenter is refused before the model is loaded
        from ..segmentation import segmenter_config

        try:
            segmenter_config(args.segmenter)
        except ValueError as error:
            raise CommandError(str(error)) from None
    describe, _ = load_region_captioner_from_options(args)
    try:
        demo = build_demo(describe, segmenter=args.segmenter)
    except ValueError as error:  # a segmenter that cannot be loaded or is not SAM
        raise CommandError(str(error)) from None
    try:
        # Gradio's own start-up lines speak of launch(share=True); this command's option is --share yes.
        demo.launch(
            server_name=args.host,
            server_port=args.port,
            share=args.share == "yes",
            quiet=True,
            prevent_thread_lock=True,
            **LAUNCH_OPTIONS,
        )
    except OSError as error:
        raise CommandError(f"cannot serve on {args.host}:{args.port}: {error}") from None
    print(f"dynrefer demo: serving on {demo.local_url}", file=sys.stderr)
    if demo.share_url:
        print(f"dynrefer demo: public link {demo.share_url}", file=sys.stderr)
    else:
        print("dynrefer demo: --share yes would add a public gradio.live link", file=sys.stderr)
    print("dynrefer demo: press Ctrl+C to stop", file=sys.stderr)
    try:
        demo.block_thread()
    finally:
        demo.close()
    return 0
