"""Control prompts: the words that steer DynRefer's caption (docs/upstream/model.md §11-§12)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "CONTROL_SEPARATOR",
    "CONTROL_TERMINATOR",
    "format_control_prompt",
    "merge_control_words",
    "parse_control_words",
]

CONTROL_SEPARATOR = ","
CONTROL_TERMINATOR = "|"


def parse_control_words(control: str | Sequence[str] | None) -> list[str]:
    """A region's control words from a list of words or one string of words separated by ``","``: each
    stripped, empty ones dropped. ``None`` gives no words."""
    if control is None:
        return []
    if isinstance(control, str):
        control = control.split(CONTROL_SEPARATOR)
    words = [str(word).strip() for word in control]
    return [word for word in words if word]


def format_control_prompt(words: Sequence[str]) -> str:
    """Upstream's control string: the words comma-joined without spaces, always ending in ``"|"``.

    ``format_control_prompt(["dog", "grass"]) == "dog,grass|"``; with no words the prompt is ``"|"``.
    """
    return CONTROL_SEPARATOR.join(words) + CONTROL_TERMINATOR


def merge_control_words(user_words: Sequence[str], predicted_tags: Sequence[str]) -> list[str]:
    """User control words first, then the predicted tags, each word once, in that order.

    Upstream joins a Python ``set`` of these words, whose order depends on the interpreter's hash
    seed; a fixed first-seen order is used here so that captions are reproducible.
    """
    return list(dict.fromkeys(word.strip() for word in [*user_words, *predicted_tags] if word.strip()))
