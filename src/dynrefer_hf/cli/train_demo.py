"""``dynrefer train-demo``: train the demonstration model on synthetic shapes scenes, on CPU.

Builds the shapes dataset, trains a tokenizer and a small DynRefer (vision tower included) with the HF
Trainer, evaluates it on the test split (caption CIDEr-D, attribute mAP, class accuracy) and saves the
model, the processor and a model card. The defaults reproduce the model shipped with the package.
"""

from __future__ import annotations

import argparse

from .common import count, number

__all__ = ["register"]


# option -> (ShapesDemoSettings field, type, help); defaults come from ShapesDemoSettings, read at run time so
# that building the `dynrefer` parser does not import torch.
_SETTING_OPTIONS = {
    "--train-images": ("num_train_images", count(1), "INT", "training scenes"),
    "--test-images": ("num_test_images", count(1), "INT", "test scenes"),
    "--epochs": ("epochs", number(0.0, low_open=True), "FLOAT", "passes over the training scenes"),
    "--max-minutes": ("max_train_minutes", number(0.0, low_open=True), "FLOAT", "stop training after this many minutes"),
    "--batch-images": ("batch_images", count(1), "INT", "scenes per optimizer step (with all their regions)"),
    "--learning-rate": ("learning_rate", number(0.0, low_open=True), "FLOAT", "AdamW peak learning rate"),
    "--seed": ("seed", count(0), "INT", "initialisation and sampling seed"),
    "--data-seed": ("data_seed", count(0), "INT", "scene generator seed"),
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
    for option, (name, kind, metavar, text) in _SETTING_OPTIONS.items():
        parser.add_argument(option, dest=name, type=kind, default=None, metavar=metavar, help=text)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..shapes import ShapesDemoSettings, train_shapes_demo

    given = {
        name: getattr(args, name)
        for name, _, _, _ in _SETTING_OPTIONS.values()
        if getattr(args, name) is not None
    }
    settings = ShapesDemoSettings(**given)
    evaluation = train_shapes_demo(args.output_dir, settings, show_progress=not args.quiet)
    scores = evaluation.percentages()
    print(f"\n{'metric':<24}{'test score':>12}")
    print(f"{'caption CIDEr-D':<24}{scores['cider_d']:>12.1f}")
    print(f"{'attribute mAP':<24}{scores['attribute_map']:>12.1f}")
    print(f"{'class accuracy (%)':<24}{scores['class_accuracy']:>12.1f}")
    print(f"\nsaved to {args.output_dir}")
    return 0
