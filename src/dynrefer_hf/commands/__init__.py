"""Subcommands of the ``dynrefer`` console script (each module exposes ``register(subparsers)``)."""
