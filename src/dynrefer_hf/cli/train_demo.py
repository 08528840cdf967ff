"""``dynrefer train-demo``: train the demonstration model on synthetic shapes scenes, on CPU.

Builds the shapes dataset, trains a tokenizer and a small DynRefer (vision tower included) with the HF
Trainer, evaluates it on the test split (caption CIDEr-D, attribute mAP, class accuracy) and saves the
model, the processor and a model card. The defaults reproduce the model shipped with the package.
"""

from __future__ import annotations

import argparse

from .errors import CommandError

__all__ = ["register"]


# option -> (ShapesDemoSettings field, type, help); defaults come from ShapesDemoSettings, read at run time so
# that building the `dynrefer` parser does not import torch.
_SETTING_OPTIONS = {
    "--train-images": ("num_train_images", int, "training scenes"),
    "--test-images": ("num_test_images", int, "test scenes"),
    "--epochs": ("epochs", float, "passes over the training scenes"),
    "--max-minutes": ("max_train_minutes", float, "stop training after this many minutes"),
    "--batch-images": ("batch_images", int, "scenes per optimizer step (with all their regions)"),
    "--learning-rate": ("learning_rate", float, "AdamW peak learning rate"),
    "--seed": ("seed", int, "initialisation and sampling seed"),
    "--data-seed": ("data_seed", int, "scene generator seed"),
}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-demo",
        help="train the demonstration model on synthetic shapes scenes (CPU, about 30 minutes)",
        description=(
            "Train a small DynRefer from scratch on procedurally generated scenes of textured shapes, evaluate "
            "it on the test split and save it with its processor and a model card. A demonstration model, not "
            "the paper's. Options left out take the settings of the model shipped with the package."
        ),
    )
    parser.add_argument(
        "--output-dir", default="shapes-demo", help="where to save the model (default: %(default)s)"
    )
    for option, (name, kind, text) in _SETTING_OPTIONS.items():
        parser.add_argument(
            option, dest=name, type=kind, default=None, metavar=kind.__name__.upper(), help=text
        )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..shapes import ShapesDemoSettings, train_shapes_demo

    given = {
        name: getattr(args, name)
        for name, _, _ in _SETTING_OPTIONS.values()
        if getattr(args, name) is not None
    }
    for option, (name, _, _) in _SETTING_OPTIONS.items():
        value = given.get(name)
        if value is not None and value <= 0 and name not in ("seed", "data_seed"):
            raise CommandError(f"{option} must be positive, got {value}")
    settings = ShapesDemoSettings(**given)
    evaluation = train_shapes_demo(args.output_dir, settings, show_progress=not args.quiet)
    scores = evaluation.percentages()
    print(f"\n{'metric':<24}{'test score':>12}")
    print(f"{'caption CIDEr-D':<24}{scores['cider_d']:>12.1f}")
    print(f"{'attribute mAP':<24}{scores['attribute_map']:>12.1f}")
    print(f"{'class accuracy (%)':<24}{scores['class_accuracy']:>12.1f}")
    print(f"\nsaved to {args.output_dir}")
    return 0
