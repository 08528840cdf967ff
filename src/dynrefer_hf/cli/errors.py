"""The error type every subcommand raises for a user-facing failure."""

__all__ = ["CommandError"]


class CommandError(Exception):
    """A user-facing failure: printed as one sentence, exit code 2, no traceback."""
