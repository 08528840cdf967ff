"""Tiny models, tokenizers and vocabularies built in the tests (no Hub access)."""

from __future__ import annotations

from functools import lru_cache

from dynrefer_hf.tokenization import train_t5_style_tokenizer

TINY_CORPUS = (
    "a red striped circle left of a blue square",
    "the man riding a horse on the beach",
    "a white dog lying on green grass",
    "two people standing next to a parked car",
    "a small black cat sitting on a wooden table",
    "person,dog,grass|",
    "horse,beach,man|",
    "car,tree,road,sky|",
    "|",
)


@lru_cache(maxsize=1)
def _tiny_tokenizer():
    return train_t5_style_tokenizer(TINY_CORPUS * 4, vocab_size=120)


def make_tiny_tokenizer():
    """A T5-style tokenizer (pad 0, eos 1, unk 2) of about 100 pieces; a fresh copy per call."""
    import copy

    return copy.deepcopy(_tiny_tokenizer())
