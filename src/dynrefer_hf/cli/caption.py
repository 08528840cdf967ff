"""``dynrefer caption IMAGE --box x1,y1,x2,y2 ...``: describe regions of an image.

Prints a table (or JSON with ``--json``); ``--draw`` writes the image with the boxes and captions,
``--show-views`` the nested views each region was described from. Several images, ``--input FILE`` or
``--output OUT.jsonl`` make it a batch job (`run_batch`: one JSON line per image, resumable, split over the
processes of ``torchrun`` / ``accelerate launch``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .common import add_model_loading_options, add_precision_options, count, number, parse_box, parse_point
from .errors import CommandError

__all__ = ["SCORES_HELP", "format_table", "register"]

SCORES_HELP = """\
What the scores are (none is a calibrated confidence):
  score       the caption's probability as a whole token sequence (the product of its token
              probabilities under beam search): small for long captions, 0.01-0.1 is usual
  class       the best of the open-vocabulary classes and its matching score (scaled similarity of
              region and class name; compare it between classes, not a probability, can be negative)
  tags        the tags whose probability passes the tag threshold (--tag-threshold)
  attributes  the best attributes with their probabilities (independent sigmoids, not summing to 1)
The JSON output says whether the results come from the demonstration model ("demonstration_model")."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "caption",
        help="describe regions of an image (caption, tags, attributes, class)",
        description="Describe regions of an image: a caption with its score, tags, attributes and a class per box.",
        epilog=SCORES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "images",
        nargs="*",
        metavar="IMAGE",
        help="image file (or http(s) URL); with several, the --box regions are described on each",
    )
    parser.add_argument(
        "--box",
        dest="boxes",
        action="append",
        type=parse_box,
        metavar="X1,Y1,X2,Y2",
        help=(
            "a region in pixels (repeat for several regions); boxes partly outside the image are clipped for "
            "the crops, boxes at most 1 px wide or high widened to 1 px; negative values are fine "
            "(--box -5,3,20,40)"
        ),
    )
    # Regions as clicks: a SAM / SAM 2 segmenter turns each point into a mask, described as --box regions are.
    parser.add_argument(
        "--point",
        dest="points",
        action="append",
        type=parse_point,
        metavar="X,Y",
        help="a region as a click in pixels (repeat for several regions); needs --segmenter",
    )
    parser.add_argument(
        "--segmenter",
        metavar="MODEL",
        help="SAM / SAM 2 folder or Hub id that makes each --point a mask (e.g. facebook/sam-vit-base)",
    )
    parser.add_argument("--model", help="model folder or Hub id (default: the package's default model)")
    parser.add_argument("--controls", help="comma-separated control words put before the predicted tags")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--draw", metavar="OUT.png", help="write the image with the boxes and their captions")
    parser.add_argument(
        "--legend",
        action="store_true",
        help="with --draw: number the boxes and list the captions below the image",
    )
    parser.add_argument("--show-views", metavar="OUT.png", help="write the nested views of each region")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    add_precision_options(parser)
    parser.add_argument("--batch-size", type=count(1), default=None, help="regions per forward pass (default 20)")
    parser.add_argument(
        "--tag-threshold", type=number(0.0, 1.0), default=None, help="tag probability threshold, in [0, 1]"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=count(1),
        default=None,
        help="caption length limit in tokens (default: the model's)",
    )
    parser.add_argument(
        "--no-captions",
        action="store_true",
        help="tags, attributes and class only: the language model does not run (much faster)",
    )
    parser.add_argument(
        "--top-attributes", type=count(0), default=3, help="attributes shown per region (default 3)"
    )
    parser.add_argument(
        "--timeout",
        type=number(0.0, low_open=True),
        default=None,
        help="seconds to wait for the server when IMAGE is a URL (default 30)",
    )
    parser.add_argument(
        "--ignore-exif-orientation",
        action="store_true",
        help="use the stored pixel order of the image file, not its EXIF orientation (upstream's behaviour)",
    )
    _add_batch_arguments(parser)
    add_model_loading_options(parser)
    parser.set_defaults(func=run)


def _add_batch_arguments(parser: argparse.ArgumentParser) -> None:
    batch = parser.add_argument_group("batch jobs (docs/pipeline.md)")
    batch.add_argument(
        "--input",
        metavar="FILE",
        help="regions to describe: a .jsonl file ({'image', 'boxes', 'controls'} per line), a COCO .json "
        "detection file, or a datasets folder / Hub id with 'image' and 'boxes' columns",
    )
    batch.add_argument("--images", dest="images_folder", metavar="DIR", help="folder of the --input file's image paths (default: its folder)")
    batch.add_argument("--split", help="the split of a --input dataset that has several (Hub default: train)")
    batch.add_argument(
        "--output",
        metavar="OUT.jsonl",
        help="write one JSON line per image as it finishes, in input order; a stopped job resumes from it",
    )
    batch.add_argument("--restart", action="store_true", help="with --output: start afresh instead of resuming")


def run(args: argparse.Namespace) -> int:
    from ..images import DEFAULT_DOWNLOAD_TIMEOUT, load_rgb_image
    from ..pipelines.region_captioning import DEMO_MODEL_MARK, _is_demo_model
    from ..segmentation import check_points_inside, region_points, segmenter_config
    from ..validation import checked_region_box
    from ..visualize import draw_clicks, draw_regions, draw_views
    from .common import load_region_captioner_from_options

    if args.input or args.output or args.restart or len(args.images) > 1:
        return run_batch(args)
    if not args.images:
        raise CommandError("no image given: name an image file (or several), or give --input FILE")
    args.image = args.images[0]
    if not args.boxes and not args.points:
        raise CommandError("no regions given: add at least one --box x1,y1,x2,y2 or --point x,y (pixels)")
    if args.boxes and args.points:
        raise CommandError("give the regions as --box or as --point, not both")
    if args.points and not args.segmenter:
        raise CommandError(
            "--point needs --segmenter MODEL: a SAM / SAM 2 folder or Hub id (e.g. facebook/sam-vit-base)"
        )
    if args.segmenter and not args.points:
        raise CommandError("--segmenter is used with --point: give the points to segment")
    for option, path in (("--draw", args.draw), ("--show-views", args.show_views)):
        if path is not None:
            _check_picture_path(option, path)
    try:
        image = load_rgb_image(
            args.image,
            timeout=DEFAULT_DOWNLOAD_TIMEOUT if args.timeout is None else args.timeout,
            exif_orientation=not args.ignore_exif_orientation,
        )
        for box in args.boxes or []:  # the pipeline's own rule, checked before the model is loaded
            checked_region_box(box, image.width, image.height, where="--box")
        check_points_inside(region_points(args.points or [[0, 0]]), image.width, image.height)
        if args.segmenter is not None:
            segmenter_config(args.segmenter)
    except (OSError, ValueError) as error:
        raise CommandError(str(error)) from None

    describe, model = load_region_captioner_from_options(args)
    try:
        results = describe(
            image,
            **(
                {"points": args.points, "segmenter": args.segmenter, "return_masks": True}
                if args.points
                else {"boxes": args.boxes}
            ),
            controls=args.controls,
            batch_size=args.batch_size,
            tag_threshold=args.tag_threshold,
            attribute_top_k=args.top_attributes,
            return_views=bool(args.show_views),
            generate_captions=not args.no_captions,
            **({} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}),
        )
    except (ValueError, TypeError) as error:
        raise CommandError(str(error)) from None

    demonstration = _is_demo_model(model)
    if args.draw:
        clicked = image
        if args.points:  # the masks the clicks made, under the boxes and captions
            clicked = draw_clicks(image, _decoded_masks(results), [[point] for point in args.points])
        mark = DEMO_MODEL_MARK if demonstration else None
        draw_regions(clicked, results, legend=args.legend, mark=mark).save(args.draw)
        print(f"wrote {args.draw}", file=sys.stderr)
    if args.show_views:
        draw_views(
            image,
            [result["views"]["crop_boxes"] for result in results],
            [result["views"]["view_boxes"] for result in results],
            [result["views"]["ratios"] for result in results],
            view_size=(describe.image_processor.size["height"], describe.image_processor.size["width"]),
            captions=[result.get("caption", "") for result in results],
        ).save(args.show_views)
        print(f"wrote {args.show_views}", file=sys.stderr)
        for result in results:
            del result["views"]

    if args.json:
        output = {"image": args.image, "model": model, "demonstration_model": demonstration, "regions": results}
        json.dump(output, sys.stdout, indent=2)
        print()
    else:
        print(f"{args.image}  (model: {model})")
        print(format_table(results))
    return 0


def run_batch(args: argparse.Namespace) -> int:
    """Several images, ``--input`` or ``--output``: `dynrefer_hf.batch.describe_dataset`, JSON lines out."""
    from ..batch import describe_dataset
    from .common import load_region_captioner_from_options

    for option in ("draw", "show_views"):
        if getattr(args, option):
            raise CommandError(f"--{option.replace('_', '-')} draws one image: drop it for a batch job")
    if args.points or args.segmenter:
        raise CommandError("--point and --segmenter describe one image: give boxes for a batch job")
    requests = _gather_requests(args)
    describe, _ = load_region_captioner_from_options(args)
    options = {
        "batch_size": args.batch_size,
        "tag_threshold": args.tag_threshold,
        "attribute_top_k": args.top_attributes,
        "exif_orientation": not args.ignore_exif_orientation,
        "generate_captions": not args.no_captions,
        **({} if args.timeout is None else {"timeout": args.timeout}),
        **({} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}),
    }
    lines = describe_dataset(describe, requests, output=args.output, restart=args.restart, progress=True, **options)
    try:
        for line in lines:
            if args.output is None:
                print(json.dumps(line))
    except (OSError, ValueError, TypeError) as error:
        raise CommandError(str(error)) from None
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # gloo can abort in its destructor at exit
            dist.destroy_process_group()
    if args.output is not None and os.environ.get("RANK", "0") == "0":  # process 0 wrote it
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _gather_requests(args: argparse.Namespace):
    """The batch job's images and regions, from IMAGE... --box ... or --input FILE, checked before the model loads."""
    from ..batch import read_region_requests, requests_from_images

    if args.input and (args.images or args.boxes or args.controls):
        raise CommandError("--input FILE names the images, boxes and controls: drop IMAGE, --box and --controls")
    if args.restart and not args.output:
        raise CommandError("--restart needs --output")
    if args.input:
        try:
            return read_region_requests(args.input, images=args.images_folder, split=args.split)
        except (OSError, ValueError) as error:
            raise CommandError(f"--input {args.input}: {error}") from None
    if not args.images:
        raise CommandError("no image given: name image files, or give --input FILE")
    if not args.boxes:
        raise CommandError("no regions given: add at least one --box x1,y1,x2,y2 (pixels), used on every image")
    return requests_from_images(args.images, args.boxes, args.controls)


def _check_picture_path(option: str, path: str) -> None:
    """Fail before any model work if the picture cannot be written where asked."""
    from PIL import Image

    target = Path(path)
    if not target.parent.is_dir():
        raise CommandError(f"{option} {path}: the folder {target.parent} does not exist")
    if target.suffix.lower() not in Image.registered_extensions():
        raise CommandError(f"{option} {path}: name the picture with an image extension such as .png or .jpg")


def _decoded_masks(results: Sequence[Mapping]):
    """The regions' masks (``"mask"``, COCO run-length encoding) as a boolean array [N, H, W]."""
    import numpy as np
    from pycocotools import mask as mask_utils

    rles = [{**result["mask"], "counts": result["mask"]["counts"].encode()} for result in results]
    return np.stack([mask_utils.decode(rle) for rle in rles]).astype(bool)


def _format_box(box: Sequence[float]) -> str:
    return ",".join(f"{value:g}" for value in box)


def format_table(results: Sequence[Mapping]) -> str:
    """The region results as an aligned text table, one row per region."""
    header = ("#", "box", "caption", "score", "class", "tags", "attributes")
    rows = [header]
    for index, result in enumerate(results):
        label = result.get("label")
        rows.append(
            (
                str(index),
                _format_box(result["box"]),
                result.get("caption", "-"),
                f"{result['score']:.3g}" if "score" in result else "-",
                f"{label['name']} ({label['score']:.2f})" if label else "-",
                ", ".join(result["tags"]) or "-",
                ", ".join(f"{item['name']} {item['score']:.2f}" for item in result["attributes"]) or "-",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
