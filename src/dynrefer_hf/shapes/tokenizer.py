"""Build a small T5-style tokenizer (a SentencePiece-like Unigram model) from text.

The released model uses Flan-T5's tokenizer. Offline, and for the small models trained by this
library, a tokenizer is made from the captions instead; it follows T5's conventions (pad 0,
eos 1, unk 2, ``</s>`` appended) so it can stand in for Flan-T5's everywhere.

The Unigram vocabulary is counted, not trained: ``tokenizers``' Unigram trainer orders pieces of
equal score differently from run to run, and a tokenizer that changes between runs (or between
the ranks of one distributed job) would make saved models and tests irreproducible.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import T5TokenizerFast

__all__ = ["train_t5_style_tokenizer"]

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
WORD_BOUNDARY = "\u2581"  # SentencePiece's "▁", put before every word by the Metaspace pre-tokenizer
_RUNS = re.compile(r"\w+|[^\w\s]")


def _count_pieces(texts: Iterable[str]) -> tuple[Counter, set[str]]:
    """Word pieces (``"▁word"`` at a word start, ``"word"`` / ``","`` inside one) and every character seen."""
    pieces: Counter = Counter()
    characters: set[str] = {WORD_BOUNDARY}
    for text in texts:
        for word in text.lower().split():
            characters.update(word)
            for index, run in enumerate(_RUNS.findall(word)):
                pieces[WORD_BOUNDARY + run if index == 0 else run] += 1
    return pieces, characters


def train_t5_style_tokenizer(texts: Iterable[str], vocab_size: int = 1000) -> T5TokenizerFast:
    """A lower-casing Unigram tokenizer for ``texts``, wrapped as a ``T5TokenizerFast``.

    The vocabulary holds the special tokens, every character of the corpus (so nothing in it is
    unknown) and the most frequent word pieces, up to ``vocab_size`` entries in all. Pieces are
    scored by their log frequency, so whole words win over spellings. Deterministic: the same
    texts always give the same ids.
    """
    pieces, characters = _count_pieces(texts)
    if not pieces:
        raise ValueError("train_t5_style_tokenizer needs at least one non-empty text")
    room = vocab_size - len(SPECIAL_TOKENS) - len(characters)
    if room < 0:
        raise ValueError(
            f"vocab_size={vocab_size} is smaller than the {len(SPECIAL_TOKENS) + len(characters)} special "
            "tokens and characters of the corpus"
        )
    total = sum(pieces.values())
    words = sorted((piece for piece in pieces if piece not in characters), key=lambda p: (-pieces[p], p))[:room]
    character_score = math.log(1 / total) - 10.0  # below any word piece: a known word is never spelled out
    vocab = [(token, 0.0) for token in SPECIAL_TOKENS]
    vocab += [(character, character_score) for character in sorted(characters)]
    vocab += [(word, math.log(pieces[word] / total)) for word in words]

    backend = Tokenizer(models.Unigram(vocab, unk_id=SPECIAL_TOKENS.index("<unk>")))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    eos_id = SPECIAL_TOKENS.index("</s>")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)]
    )
    return T5TokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    )
