"""``dynrefer info MODEL``: what a DynRefer model is made of, without loading its weights.

Prints the configuration's main sizes, the vocabulary sizes and the parameter count of every part
(the model is built on PyTorch's ``meta`` device, so nothing is allocated or read).
"""

from __future__ import annotations

import argparse
import json
import sys

import PIL

__all__ = ["model_summary", "register"]


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "info",
        help="summarise a model: configuration, vocabularies, parameter counts",
        description="Summarise a DynRefer model: configuration, vocabulary sizes and parameters per part.",
    )
    parser.add_argument(
        "model", nargs="?", help="model folder or Hub id (default: the package's default model)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument(
        "--quiet", action="store_true", help="no notice when the embedded demonstration model is used"
    )
    parser.set_defaults(func=run)


def _tokenizer_size(model: str, revision: str | None) -> int | None:
    """The tokenizer's vocabulary size, or None when the model has no loadable tokenizer."""
    from transformers import AutoTokenizer

    try:
        return len(AutoTokenizer.from_pretrained(model, revision=revision))
    except (OSError, ValueError):
        return None


def _parameter_counts(config) -> list[dict]:
    """Per top-level part: its name, parameter count and how many of them are trainable."""
    import torch

    from ..modeling_dynrefer import DynReferForRegionCaptioning

    with torch.device("meta"):
        model = DynReferForRegionCaptioning(config)
    parts: dict[str, dict] = {}
    for name, parameter in model.named_parameters():
        part = parts.setdefault(
            name.split(".")[0], {"part": name.split(".")[0], "parameters": 0, "trainable": 0}
        )
        part["parameters"] += parameter.numel()
        part["trainable"] += parameter.numel() if parameter.requires_grad else 0
    return list(parts.values())


def model_summary(model: str, revision: str | None = None) -> dict:
    """The summary ``dynrefer info`` prints, as a dict."""
    from .common import load_config

    config = load_config(model, revision)
    vision, qformer, text = config.vision_config, config.qformer_config, config.text_config
    text_encoder = config.text_encoder_config
    return {
        "model": model,
        "model_type": config.model_type,
        "num_views": config.num_views,
        "image_size": vision.image_size,
        "vision": f"{vision.num_hidden_layers} layers, width {vision.hidden_size}, patch {vision.patch_size}",
        "qformer": f"{qformer.num_hidden_layers} layers, width {qformer.hidden_size}, {config.num_query_tokens} queries",
        "language_model": f"{text.model_type}, width {getattr(text, 'd_model', getattr(text, 'hidden_size', '?'))}",
        "text_encoder": (
            f"{text_encoder.model_type}, {text_encoder.num_hidden_layers} layers"
            if text_encoder is not None
            else None
        ),
        "tag_threshold": config.tag_threshold,
        "vocabularies": {
            "tokenizer": _tokenizer_size(model, revision),
            "tags": config.num_tags,
            "attributes": config.num_attributes,
            "attribute_prompts": config.num_attribute_prompts,
            "classes": config.num_classes,
        },
        "parameters": _parameter_counts(config),
        # The views' pixels come from Pillow's resize, which changed between versions (docs/processor.md).
        "pillow": PIL.__version__,
    }


def _human(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def run(args: argparse.Namespace) -> int:
    from .common import model_or_default

    summary = model_summary(*model_or_default(args.model, args.quiet))
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        print()
        return 0
    for key in (
        "model",
        "model_type",
        "num_views",
        "image_size",
        "vision",
        "qformer",
        "language_model",
        "text_encoder",
        "tag_threshold",
    ):
        print(f"{key:<16}{summary[key] if summary[key] is not None else '-'}")
    print(f"{'pillow':<16}{summary['pillow']} (the views' pixels depend on its version: docs/processor.md)")
    vocabularies = summary["vocabularies"]
    print(
        "vocabularies    "
        + ", ".join(f"{name} {size if size is not None else '-'}" for name, size in vocabularies.items())
    )
    parts = summary["parameters"]
    width = max(len(part["part"]) for part in parts)
    print(f"\n{'part':<{width}}  {'parameters':>12}  {'trainable':>12}")
    for part in parts:
        print(f"{part['part']:<{width}}  {_human(part['parameters']):>12}  {_human(part['trainable']):>12}")
    total = sum(part["parameters"] for part in parts)
    trainable = sum(part["trainable"] for part in parts)
    print(f"{'total':<{width}}  {_human(total):>12}  {_human(trainable):>12}")
    return 0
