"""Train a small T5-style tokenizer (SentencePiece-like Unigram) from text.

The released model uses Flan-T5's tokenizer. Offline, and for the small models trained by this
library, a tokenizer is trained on the captions instead; it follows T5's conventions (pad 0,
eos 1, unk 2, ``</s>`` appended) so it can stand in for Flan-T5's everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import T5TokenizerFast

__all__ = ["train_t5_style_tokenizer"]

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")


def train_t5_style_tokenizer(texts: Iterable[str], vocab_size: int = 1000) -> T5TokenizerFast:
    """Train a lower-casing Unigram tokenizer on ``texts`` and wrap it as a ``T5TokenizerFast``.

    Training is deterministic for a given corpus. The vocabulary may come out smaller than
    ``vocab_size`` when the corpus is small.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("train_t5_style_tokenizer needs at least one text")
    backend = Tokenizer(models.Unigram())
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), unk_token="<unk>", show_progress=False
    )
    backend.train_from_iterator(texts, trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", backend.token_to_id("</s>"))]
    )
    return T5TokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    )
