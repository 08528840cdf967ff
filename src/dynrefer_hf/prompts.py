"""Control prompts: the words that steer DynRefer's caption (docs/upstream/model.md §11-§12), as text and as
token ids."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "CONTROL_SEPARATOR",
    "CONTROL_TERMINATOR",
    "ControlPromptTokens",
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


@dataclass(frozen=True)
class ControlPromptTokens:
    """Upstream's control prompt written in token ids, so that the model builds ``"w1,w2|"`` from its predicted
    tags without a tokenizer (docs/model.md, "Control prompts on token ids").

    A tokenizer writes a word differently first in the prompt (after its word-start marker) and after the
    separator, so every tag is kept in both forms. ``from_tokenizer`` builds the table and checks, tag by tag,
    that joining the pieces gives exactly what the tokenizer gives for the whole string.

    Fields: ``tags_first[i]`` / ``tags_following[i]`` the ids of tag ``i`` as the first word / after the
    separator; ``separator`` (``","``), ``terminator`` (``"|"`` after a word), ``empty_prompt`` (``"|"`` alone);
    ``prefix`` / ``suffix`` the special tokens the tokenizer adds around a text (T5: EOS after it); ``pad_id``;
    ``max_length`` the truncation length (special tokens included, as the tokenizer truncates).
    """

    tags_first: tuple[tuple[int, ...], ...]
    tags_following: tuple[tuple[int, ...], ...]
    separator: tuple[int, ...]
    terminator: tuple[int, ...]
    empty_prompt: tuple[int, ...]
    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    pad_id: int
    max_length: int

    @classmethod
    def from_tokenizer(cls, tokenizer, tag_names: Sequence[str], max_length: int) -> ControlPromptTokens:
        """The table of ``tag_names`` for ``tokenizer``.

        Raises:
            ValueError: a tag the tokenizer writes differently inside a prompt than its pieces joined (it merges
                a tag with ``","`` or ``"|"``), named, or a tag holding ``","`` or ``"|"``.
        """
        tags = [str(tag) for tag in tag_names]
        if not tags:
            raise ValueError("the tag vocabulary is empty")
        bad = [tag for tag in tags if CONTROL_SEPARATOR in tag or CONTROL_TERMINATOR in tag or tag != tag.strip()]
        if bad:
            raise ValueError(f"tags cannot hold ',' or '|' or surrounding spaces: {bad[:5]}")

        def encode(texts: list[str]) -> list[list[int]]:
            return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]

        empty_prompt = encode([CONTROL_TERMINATOR])[0]
        with_specials = list(tokenizer(CONTROL_TERMINATOR)["input_ids"])
        start = next(
            (i for i in range(len(with_specials)) if with_specials[i : i + len(empty_prompt)] == empty_prompt), None
        )
        if start is None:
            raise ValueError("the tokenizer writes '|' differently with and without its special tokens")
        prefix, suffix = with_specials[:start], with_specials[start + len(empty_prompt) :]

        first = encode(tags)
        probe = tags[0]
        terminator = encode([probe + CONTROL_TERMINATOR])[0][len(first[0]) :]
        separator = encode([probe + CONTROL_SEPARATOR])[0][len(first[0]) :]
        pairs = encode([f"{tag}{CONTROL_SEPARATOR}{tag}" for tag in tags])
        following = [pair[len(ids) + len(separator) :] for pair, ids in zip(pairs, first)]
        closed = encode([tag + CONTROL_TERMINATOR for tag in tags])
        closed_pairs = encode([f"{tag}{CONTROL_SEPARATOR}{tag}{CONTROL_TERMINATOR}" for tag in tags])
        merged = [
            tag
            for tag, ids, later, alone, pair in zip(tags, first, following, closed, closed_pairs)
            if not ids
            or not later
            or alone != ids + terminator
            or pair != ids + separator + later + terminator
        ]
        if merged or not separator or not terminator:
            raise ValueError(
                "this tokenizer merges tags with ',' or '|' (or writes them as nothing), so control prompts cannot be "
                f"built from token pieces: {merged[:5]}"
            )
        pad_id = tokenizer.pad_token_id
        return cls(
            tags_first=tuple(map(tuple, first)),
            tags_following=tuple(map(tuple, following)),
            separator=tuple(separator),
            terminator=tuple(terminator),
            empty_prompt=tuple(empty_prompt),
            prefix=tuple(prefix),
            suffix=tuple(suffix),
            pad_id=0 if pad_id is None else int(pad_id),
            max_length=int(max_length),
        )

    @classmethod
    def from_dict(cls, table: Mapping[str, Any]) -> ControlPromptTokens:
        """The table from its JSON form (``to_dict``, as ``DynReferConfig.control_prompt_tokens`` stores it)."""
        fields = {}
        for name in ("tags_first", "tags_following"):
            fields[name] = tuple(tuple(int(i) for i in ids) for ids in table[name])
        for name in ("separator", "terminator", "empty_prompt", "prefix", "suffix"):
            fields[name] = tuple(int(i) for i in table[name])
        return cls(**fields, pad_id=int(table["pad_id"]), max_length=int(table["max_length"]))

    def to_dict(self) -> dict[str, Any]:
        return {name: _as_lists(value) for name, value in asdict(self).items()}

    @property
    def num_tags(self) -> int:
        return len(self.tags_first)

    def _user_words(self, ids: Sequence[int]) -> list[tuple[int, ...]] | None:
        """The words of a tokenised user prompt ``"w1,w2|"`` (special tokens included, padding removed), each
        in the form of its position; ``None`` when the prompt does not end in the terminator (truncated)."""
        start, stop = len(self.prefix), len(ids) - len(self.suffix)
        body = tuple(ids[start:stop])
        if body == self.empty_prompt:
            return []
        if len(body) <= len(self.terminator) or body[-len(self.terminator) :] != self.terminator:
            return None
        body = body[: -len(self.terminator)]
        words, word, step = [], [], len(self.separator)
        position = 0
        while position < len(body):
            if body[position : position + step] == self.separator:
                words.append(tuple(word))
                word, position = [], position + step
            else:
                word.append(body[position])
                position += 1
        words.append(tuple(word))
        return words

    def prompt_ids(self, user_ids: Sequence[int] | None, tags: Sequence[int]) -> list[int]:
        """The ids of the control prompt of one region: its user's words (``user_ids``, the tokenised
        ``"w1,w2|"`` of the processor, padding removed; ``None``: no words), then the tags ``tags`` (indices, in
        tag-list order) the user did not name, each once, truncated to ``max_length`` as the tokenizer would.

        A user prompt the tokenizer already truncated is kept as it is: the tags would be cut off anyway."""
        words = [] if user_ids is None else self._user_words(user_ids)
        if words is None:
            return list(user_ids)
        for tag in tags:
            if words and (self.tags_first[tag] == words[0] or self.tags_following[tag] in words[1:]):
                continue
            words.append(self.tags_following[tag] if words else self.tags_first[tag])
        if words:
            body = list(words[0])
            for word in words[1:]:
                body += [*self.separator, *word]
            body += self.terminator
        else:
            body = list(self.empty_prompt)
        body = body[: max(self.max_length - len(self.prefix) - len(self.suffix), 0)]
        return [*self.prefix, *body, *self.suffix]


def _as_lists(value):
    return [_as_lists(item) for item in value] if isinstance(value, tuple) else value
