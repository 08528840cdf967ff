"""The ``dynrefer`` console script.

Each subcommand lives in its own module, which exposes ``register(subparsers)``; that function adds
an ``argparse`` sub-parser whose ``func`` default takes the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that contribute subcommands, in the order they are listed by ``dynrefer --help``.
COMMAND_MODULES: tuple[str, ...] = (
    "dynrefer_hf.commands.caption",
    "dynrefer_hf.commands.info",
    "dynrefer_hf.commands.train_demo",
    "dynrefer_hf.commands.scene",
    "dynrefer_hf.commands.convert",
)


class CommandError(Exception):
    """A user-facing failure: printed as one sentence, exit code 2, no traceback."""


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


if __name__ == "__main__":
    # Under `python -m dynrefer_hf.cli` this file is `__main__`; run the package's copy so that the
    # CommandError raised by the subcommands is the class caught in `main`.
    from dynrefer_hf.cli import main as package_main

    sys.exit(package_main())
