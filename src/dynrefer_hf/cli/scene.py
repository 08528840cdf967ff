"""``dynrefer scene OUT.png``: write a synthetic shapes scene (docs/data.md) and print its boxes.

The boxes are printed as ``--box x1,y1,x2,y2`` arguments, ready for ``dynrefer caption OUT.png ...``,
followed by the reference caption of each shape, so the embedded demonstration model can be tried
offline on the kind of scene it was trained for.
"""

from __future__ import annotations

import argparse
import json

from .common import count
from .errors import CommandError

__all__ = ["register"]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "scene",
        help="write a synthetic shapes scene and print its boxes (to try the demonstration model)",
        description=(
            "Write a synthetic scene of textured shapes (a test-split scene of the demonstration model's dataset) "
            "and print its boxes as --box arguments for `dynrefer caption`, with the reference captions."
        ),
    )
    parser.add_argument("output", metavar="OUT.png", nargs="?", help="where to write the scene")
    parser.add_argument("--index", type=count(0), default=0, help="which test scene (default: %(default)s)")
    parser.add_argument("--seed", type=count(0), default=0, help="scene generator seed (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the boxes and captions as JSON")
    upstream = parser.add_argument_group("benchmark files (for `dynrefer eval`)")
    upstream.add_argument(
        "--upstream",
        metavar="DIR",
        help="instead of one scene, write --count test scenes as an upstream annotation file DIR/annotations.json "
        "with DIR/images (docs/evaluation.md)",
    )
    upstream.add_argument("--count", type=count(1), default=16, help="scenes for --upstream (default: %(default)s)")
    upstream.add_argument(
        "--region-per-image",
        action="store_true",
        help="--upstream: one image record per region, the layout of region-captioning files (refcocog, vg-reg)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from PIL import Image

    from ..shapes import export_shapes_upstream, shapes_split

    if args.upstream:
        try:
            path = export_shapes_upstream(
                args.upstream, args.count, seed=args.seed, one_region_per_image=args.region_per_image
            )
        except OSError as error:
            raise CommandError(f"cannot write to {args.upstream}: {error}") from None
        print(f"wrote {path} ({args.count} scenes, images in {args.upstream}/images)")
        return 0
    if args.output is None:
        raise CommandError("give OUT.png (one scene) or --upstream DIR (benchmark files)")
    target = Path(args.output)
    if not target.parent.is_dir():
        raise CommandError(f"cannot write {args.output}: the folder {target.parent} does not exist")
    if target.suffix.lower() not in Image.registered_extensions():
        raise CommandError(f"cannot write {args.output}: name the picture with an image extension such as .png")
    record = shapes_split("test", 1, seed=args.seed, start=args.index)[0]
    try:
        record["image"].save(args.output)
    except (OSError, ValueError) as error:
        raise CommandError(f"cannot write {args.output}: {error}") from None
    boxes = [[int(value) for value in box] for box in record["boxes"]]
    if args.json:
        print(json.dumps({"image": args.output, "boxes": boxes, "captions": record["captions"]}))
        return 0
    lines = [" ".join(f"--box {x1},{y1},{x2},{y2}" for x1, y1, x2, y2 in boxes)]
    lines += [f"# {box}: {caption}" for box, caption in zip(boxes, record["captions"])]
    # One write, so that `dynrefer scene s.png | head -n 1` gets the boxes without a broken pipe.
    print("\n".join(lines))
    return 0
