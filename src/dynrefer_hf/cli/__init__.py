"""The ``dynrefer`` console script.

Each subcommand lives in its own module of this package, which exposes ``register(subparsers)``; that
function adds an ``argparse`` sub-parser whose ``func`` default takes the parsed arguments and returns an
exit code. Subcommands share helpers through `common` and never import each other.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from .errors import CommandError

__all__ = ["COMMAND_MODULES", "CommandError", "attach_negative_values", "build_parser", "main"]

# Modules that contribute subcommands, in the order they are listed by ``dynrefer --help``.
COMMAND_MODULES: tuple[str, ...] = (
    "dynrefer_hf.cli.caption",
    "dynrefer_hf.cli.info",
    "dynrefer_hf.cli.train_demo",
    "dynrefer_hf.cli.scene",
    "dynrefer_hf.cli.convert",
    "dynrefer_hf.cli.demo",
    "dynrefer_hf.cli.eval",
    "dynrefer_hf.cli.serve",
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


# Options whose value is a box: `--box -5,3,20,40` would otherwise be taken for an option by argparse.
BOX_OPTIONS = ("--box", "--check-box")


def attach_negative_values(argv: list[str], options: tuple[str, ...] = BOX_OPTIONS) -> list[str]:
    """``["--box", "-5,3,20,40"]`` as ``["--box=-5,3,20,40"]``, which argparse reads as the option's value.

    argparse takes an argument starting with ``-`` for an option unless it is a plain negative number, so
    a box whose first coordinate is negative would be refused as a missing value.
    """
    joined: list[str] = []
    index = 0
    while index < len(argv):
        argument = argv[index]
        if argument == "--":
            joined.extend(argv[index:])
            break
        following = argv[index + 1] if index + 1 < len(argv) else ""
        if (
            argument in options
            and len(following) > 1
            and following[0] == "-"
            and following[1] in "0123456789."
        ):
            joined.append(f"{argument}={following}")
            index += 2
            continue
        joined.append(argument)
        index += 1
    return joined


def main(argv: list[str] | None = None) -> int:
    """Run ``dynrefer ARGS``; returns the exit status.

    A user-facing failure (`CommandError`) prints one line on stderr and returns 2, as argparse does for
    argument errors; anything else is a bug: its traceback is shown with a line asking to report it.
    """
    argv = attach_negative_values(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    import dynrefer_hf

    dynrefer_hf.register()  # `import dynrefer_hf` leaves it to the command (fast --help)
    try:
        return int(args.func(args) or 0)
    except CommandError as error:
        print(f"dynrefer {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dynrefer {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - a bug: shown with its traceback, then the request to report it
        traceback.print_exc()
        print(
            f"dynrefer {args.command}: an internal error stopped the command; this is a bug in dynrefer_hf, "
            "please report it with the command line and the traceback above",
            file=sys.stderr,
        )
        return 1
