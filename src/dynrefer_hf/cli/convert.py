"""``dynrefer convert`` (upstream checkpoints -> Hub-ready folder) and ``dynrefer push`` (folder -> Hub).

See docs/converting.md for where every input file comes from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import check_device, number, parse_box
from .errors import CommandError

__all__ = ["register", "run_check", "run_convert", "run_push"]

LANGUAGE_MODEL_DTYPES = ("bfloat16", "float32")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert the released DynRefer checkpoints into a Hugging Face model folder",
        description=(
            "Convert a released DynRefer checkpoint (vg1.2_5e.pth or refcocog_ft.pth) together with its frozen "
            "parts (LAVIS BLIP-2 Flan-T5-XL, EVA ViT-g, Flan-T5-XL, EVA-CLIP) into a save_pretrained folder: "
            "sharded safetensors, config, generation config, processor, tokenizer and model card."
        ),
    )
    inputs = parser.add_argument_group("inputs (see docs/converting.md)")
    inputs.add_argument("--dynrefer", required=True, metavar="PTH", help="vg1.2_5e.pth or refcocog_ft.pth")
    inputs.add_argument("--blip2", required=True, metavar="PTH", help="LAVIS blip2_pretrained_flant5xl.pth")
    inputs.add_argument("--eva-vit", required=True, metavar="PTH", help="LAVIS eva_vit_g.pth")
    inputs.add_argument("--flan-t5", default="google/flan-t5-xl", help="Flan-T5-XL folder or Hub id")
    inputs.add_argument("--eva-clip", required=True, metavar="PT", help="BAAI eva_clip_psz14.pt (text tower)")
    inputs.add_argument(
        "--clip-tokenizer",
        default="openai/clip-vit-large-patch14",
        help="folder or Hub id of a CLIP BPE tokenizer (OpenAI's vocabulary, as EVA-CLIP uses)",
    )
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument(
        "--language-model-dtype",
        choices=LANGUAGE_MODEL_DTYPES,
        default="bfloat16",
        help="dtype of the Flan-T5 weights: bfloat16 as upstream (default) or float32",
    )
    parser.add_argument(
        "--keep-text-encoder",
        action="store_true",
        help="also store the EVA-CLIP text tower (to change vocabularies)",
    )
    parser.add_argument(
        "--tag-threshold",
        type=number(0.0, 1.0),
        help="default tag threshold, in [0, 1] (0.7; upstream evaluates RefCOCOg at 0.76)",
    )
    parser.add_argument(
        "--config", metavar="JSON", help="a DynReferConfig config.json to convert into (default: released)"
    )
    parser.add_argument(
        "--text-encoder-config", metavar="JSON", help="CLIPTextConfig of the text tower (default: EVA-CLIP)"
    )
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    parser.add_argument("--repo-id", default="callsys/dynrefer", help="repository named in the model card")
    parser.add_argument(
        "--report", metavar="JSON", help="write every source key's fate (consumed/dropped) here"
    )
    parser.add_argument(
        "--check", action="store_true", help="load the result and describe one region of an image"
    )
    parser.add_argument("--check-image", help="image for --check (default: a generated shapes scene)")
    parser.add_argument("--check-box", type=parse_box, metavar="X1,Y1,X2,Y2", help="region for --check-image")
    parser.add_argument(
        "--device", help="device for the text tower (label tables) and --check (default: cuda when available)"
    )
    parser.set_defaults(func=run_convert)

    push = subparsers.add_parser(
        "push",
        help="upload a converted model folder (weights, processor, model card) to the Hugging Face Hub",
        description="Upload a folder written by `dynrefer convert` to a Hub model repository.",
    )
    push.add_argument("folder", help="the converted folder")
    push.add_argument(
        "--repo-id", default="callsys/dynrefer", help="target repository (default callsys/dynrefer)"
    )
    push.add_argument("--private", action="store_true", help="create the repository as private")
    push.add_argument("--revision", help="branch to push to (default main)")
    push.add_argument("--commit-message", default="Upload DynRefer converted with dynrefer_hf")
    push.set_defaults(func=run_push)


def _read_json(path: str, what: str) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CommandError(f"cannot read the {what} {path}: {error}") from None


def run_convert(args: argparse.Namespace) -> int:
    import torch

    from ..configuration_dynrefer import DynReferConfig
    from ..convert import convert_checkpoints, save_converted

    for option, path in (
        ("--dynrefer", args.dynrefer),
        ("--blip2", args.blip2),
        ("--eva-vit", args.eva_vit),
        ("--eva-clip", args.eva_clip),
    ):
        if not Path(path).is_file():
            raise CommandError(f"{option} {path}: no such file (docs/converting.md says where to get it)")
    device = check_device(args.device)
    config = None
    if args.config:
        model_type = _read_json(args.config, "config").get("model_type", DynReferConfig.model_type)
        if model_type != DynReferConfig.model_type:
            raise CommandError(
                f"--config {args.config}: its model_type is {model_type!r}, not {DynReferConfig.model_type!r}: "
                "give the config.json of a DynRefer model (as `dynrefer convert` writes it), or leave --config "
                "out for the released configuration"
            )
        try:
            config = DynReferConfig.from_json_file(args.config)
        except (ValueError, TypeError) as error:
            raise CommandError(f"--config {args.config}: {error}") from None
    text_encoder_config = (
        _read_json(args.text_encoder_config, "text encoder config") if args.text_encoder_config else None
    )
    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        raise CommandError(f"{output} exists and is not empty; choose a new --output folder")
    try:
        converted = convert_checkpoints(
            dynrefer=args.dynrefer,
            blip2=args.blip2,
            eva_vit=args.eva_vit,
            flan_t5=args.flan_t5,
            eva_clip=args.eva_clip,
            clip_tokenizer=args.clip_tokenizer,
            config=config,
            text_encoder_config=text_encoder_config,
            keep_text_encoder=args.keep_text_encoder,
            language_model_dtype=getattr(torch, args.language_model_dtype),
            device=device,
        )
    except (ValueError, KeyError, OSError) as error:  # the conversion's errors all derive from these
        raise CommandError(str(error)) from None
    if args.tag_threshold is not None:
        converted.config.tag_threshold = args.tag_threshold
    save_converted(
        converted,
        output,
        repo_id=args.repo_id,
        checkpoint_name=Path(args.dynrefer).stem,
        max_shard_size=args.max_shard_size,
    )
    print(converted.report.summary())
    print(f"wrote {output}")
    if args.report:
        report = converted.report
        Path(args.report).write_text(
            json.dumps(
                {
                    "consumed": report.consumed,
                    "superseded": report.superseded,
                    "dropped": report.dropped,
                    "created": report.created,
                    "computed": report.computed,
                },
                indent=1,
            ),
            encoding="utf-8",
        )
    if args.check:
        run_check(str(output), args.check_image, args.check_box, args.device)
    return 0


def run_check(model: str, image_path: str | None, box: list[float] | None, device: str | None) -> None:
    """Load `model` through the pipeline and print the description of one region."""
    from ..images import load_rgb_image
    from .common import load_region_captioner

    if image_path is None:
        import numpy as np

        from ..shapes.scenes import generate_scene

        scene = generate_scene(np.random.default_rng(0))
        image, box = scene.image, list(scene.objects[0].box)
        where = f"a generated scene, its {scene.objects[0].colour} {scene.objects[0].shape}"
    else:
        if box is None:
            raise CommandError("--check-image needs --check-box x1,y1,x2,y2")
        try:
            image = load_rgb_image(image_path)
        except (OSError, ValueError) as error:
            raise CommandError(str(error)) from None
        where = image_path
    describe = load_region_captioner(model, device=device)
    result = describe(image, boxes=[box])[0]
    print(f"check ({where}, box {[round(value) for value in box]}):")
    print(f"  caption: {result['caption']!r} (score {result['score']:.3f})")
    print(f"  tags: {', '.join(result['tags']) or '-'}")
    print(f"  class: {result.get('label')}")


def run_push(args: argparse.Namespace) -> int:
    from huggingface_hub import HfApi

    folder = Path(args.folder)
    if not (folder / "config.json").is_file() or not (folder / "README.md").is_file():
        raise CommandError(
            f"{folder} is not a folder written by `dynrefer convert` (no config.json / README.md)"
        )
    api = HfApi()
    try:
        api.create_repo(args.repo_id, private=args.private, exist_ok=True)
        commit = api.upload_folder(
            repo_id=args.repo_id,
            folder_path=folder,
            revision=args.revision,
            commit_message=args.commit_message,
        )
    except (OSError, ValueError) as error:  # Hub HTTP errors (authentication, permissions) are OSErrors
        raise CommandError(f"upload to {args.repo_id} failed: {error}") from None
    print(f"pushed {folder} to {commit}")
    return 0
