"""CIDEr-D, exactly as pycocoevalcap computes it, in pure Python (no Java tokenizer).

pycocoevalcap's ``Cider`` (the CIDEr-D variant): n-grams n = 1..4, tf-idf weights with document
frequencies counted over the evaluated references, a clipped cosine similarity per n, a Gaussian
length penalty with sigma = 6, the mean over n, averaged over references and multiplied by 10.
Papers, DynRefer's included, print this value times 100.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["CiderResult", "cider_d", "simple_tokenize"]

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")


def simple_tokenize(text: str) -> str:
    """Lower-case ``text``, keep runs of letters and digits (with an inner apostrophe), drop punctuation.

    A stand-in for the Java PTB tokenizer that pycocoevalcap runs first; it agrees with it on plain
    captions but splits hyphenated words and contractions differently.
    """
    return " ".join(_WORD.findall(text.lower()))


@dataclass(frozen=True)
class CiderResult:
    """``score`` is the corpus CIDEr-D (mean of ``scores``); ``scores`` [N] one value per candidate."""

    score: float
    scores: np.ndarray


def _ngram_counts(sentence: str, n: int) -> Counter:
    words = sentence.split()
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _tfidf(counts: Counter, document_frequency: Counter, log_num_documents: float, n: int):
    """Per-order tf-idf vectors, their norms, and the sentence "length"."""
    vectors = [{} for _ in range(n)]
    squared_norms = [0.0] * n
    length = 0
    for ngram, term_frequency in counts.items():
        order = len(ngram) - 1
        weight = term_frequency * (log_num_documents - math.log(max(1.0, document_frequency[ngram])))
        vectors[order][ngram] = weight
        squared_norms[order] += weight * weight
        # pycocoevalcap's quirk: the length used by the penalty counts bigrams, not words.
        if order == 1:
            length += term_frequency
    return vectors, [math.sqrt(value) for value in squared_norms], length


def _similarity(candidate, reference, n: int, sigma: float) -> float:
    (cand_vectors, cand_norms, cand_length), (ref_vectors, ref_norms, ref_length) = candidate, reference
    penalty = math.exp(-((cand_length - ref_length) ** 2) / (2 * sigma**2))
    total = 0.0
    for order in range(n):
        ref_vector = ref_vectors[order]
        # Clipping (the "-D" of CIDEr-D): a candidate n-gram counts at most as often as in the reference.
        value = sum(
            min(weight, ref_vector.get(ngram, 0.0)) * ref_vector.get(ngram, 0.0)
            for ngram, weight in cand_vectors[order].items()
        )
        if cand_norms[order] != 0 and ref_norms[order] != 0:
            value /= cand_norms[order] * ref_norms[order]
        total += value * penalty
    return total / n


def cider_d(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    n: int = 4,
    sigma: float = 6.0,
    tokenize: bool = True,
) -> CiderResult:
    """CIDEr-D of ``candidates[i]`` against ``references[i]`` (one or more strings), over the corpus.

    The values equal ``pycocoevalcap.cider.Cider().compute_score`` on the same (tokenised) strings.
    Document frequencies come from these references, so the score depends on the whole corpus.
    With ``tokenize=False`` the strings are split on whitespace as given.
    """
    if len(candidates) != len(references):
        raise ValueError(f"got {len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("cider_d needs at least one candidate")
    if any(isinstance(refs, str) or len(refs) == 0 for refs in references):
        raise ValueError("every candidate needs a non-empty list of reference strings")
    prepare = simple_tokenize if tokenize else (lambda text: text)
    candidate_counts = [_ngram_counts(prepare(text), n) for text in candidates]
    reference_counts = [[_ngram_counts(prepare(text), n) for text in refs] for refs in references]

    document_frequency: Counter = Counter()
    for refs in reference_counts:
        document_frequency.update({ngram for counts in refs for ngram in counts})
    log_num_documents = math.log(float(len(references)))

    scores = []
    for counts, refs in zip(candidate_counts, reference_counts):
        candidate = _tfidf(counts, document_frequency, log_num_documents, n)
        total = sum(
            _similarity(candidate, _tfidf(ref, document_frequency, log_num_documents, n), n, sigma)
            for ref in refs
        )
        scores.append(total / len(refs) * 10.0)
    scores = np.asarray(scores, dtype=np.float64)
    return CiderResult(score=float(scores.mean()), scores=scores)
