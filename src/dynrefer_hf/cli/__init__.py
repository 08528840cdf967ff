"""The ``dynrefer`` console script.

Each subcommand lives in its own module of this package, which exposes ``register(subparsers)``; that
function adds an ``argparse`` sub-parser whose ``func`` default takes the parsed arguments and returns an
exit code. Subcommands share helpers through `common` and never import each other.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import CommandError

__all__ = ["COMMAND_MODULES", "CommandError", "build_parser", "main"]

# Modules that contribute subcommands, in the order they are listed by ``dynrefer --help``.
COMMAND_MODULES: tuple[str, ...] = (
    "dynrefer_hf.cli.caption",
    "dynrefer_hf.cli.info",
    "dynrefer_hf.cli.train_demo",
    "dynrefer_hf.cli.scene",
    "dynrefer_hf.cli.convert",
    "dynrefer_hf.cli.demo",
    "dynrefer_hf.cli.eval",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynrefer",
        description="Describe image regions with DynRefer: captions, tags, attributes and classes.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CommandError as error:
        print(f"dynrefer {args.command}: {error}", file=sys.stderr)
        return 2
