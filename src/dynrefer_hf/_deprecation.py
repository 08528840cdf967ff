"""Old import paths of names that moved keep working, with a warning (as transformers does)."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable

__all__ = ["moved_module"]


def moved_module(old_name: str, new_name: str) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``old_name`` that serves every name from ``new_name`` with a FutureWarning."""

    def __getattr__(name: str) -> object:
        value = getattr(importlib.import_module(new_name), name)
        warnings.warn(
            f"{old_name}.{name} moved to {new_name}.{name}; the old path will be removed in a future release",
            FutureWarning,
            stacklevel=2,
        )
        return value

    return __getattr__
