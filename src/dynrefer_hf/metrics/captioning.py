"""Caption metrics through pycocoevalcap: PTB tokenisation, BLEU-1..4, METEOR 1.5, ROUGE-L and CIDEr-D.

This is the path of pycocoevalcap's ``COCOEvalCap.evaluate`` (docs/upstream/evaluation.md §3) without
SPICE, which downloads Stanford models at run time and is not part of the protocol's reported numbers.
The PTB tokenizer and METEOR are Java programs shipped inside pycocoevalcap; `require_java` turns a
missing ``java`` into one clear error instead of a ``FileNotFoundError`` from deep inside a subprocess.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CAPTION_METRICS",
    "CaptionScores",
    "CiderResult",
    "JavaNotFoundError",
    "caption_scores",
    "cider_d",
    "meteor_scores",
    "ptb_tokenize",
    "require_java",
]

# The metrics of `caption_scores`, in COCOEvalCap's order and with its names.
CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")

JAVA_INSTALL_HINT = (
    "install a Java runtime (Debian/Ubuntu: `apt-get install -y default-jre-headless`; conda: "
    "`conda install -c conda-forge openjdk`) and make sure `java` is on PATH"
)


class JavaNotFoundError(RuntimeError):
    """``java`` is not on PATH, but pycocoevalcap's PTB tokenizer and METEOR need it."""


def require_java() -> str:
    """The path of ``java``; raises `JavaNotFoundError` saying what to install when there is none."""
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(
            "the caption metrics run pycocoevalcap's PTB tokenizer and METEOR 1.5, which are Java programs, "
            f"but no `java` was found: {JAVA_INSTALL_HINT}"
        )
    return java


def ptb_tokenize(texts: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """pycocoevalcap's ``PTBTokenizer`` (Stanford CoreNLP 3.4.1, lower-cased, punctuation removed) of every text.

    ``texts`` maps a key to a list of strings; the result has the same keys and list lengths.
    """
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    require_java()
    # The tokenizer joins all texts with newlines and splits its output on them: keep texts one line each.
    packed = {key: [{"caption": " ".join(str(text).split())} for text in values] for key, values in texts.items()}
    if not any(packed.values()):
        return {key: [] for key in texts}
    tokenized = PTBTokenizer().tokenize(packed)
    return {key: tokenized.get(key, []) for key in texts}


def _meteor_compute(gts: dict, res: dict) -> tuple[float, list[float]]:
    """pycocoevalcap's ``Meteor.compute_score`` in one ``java -jar meteor-1.5.jar -stdio -l en -norm`` process,
    which is stopped afterwards (its ``__del__`` stops it again, harmlessly)."""
    from pycocoevalcap.meteor.meteor import Meteor

    require_java()
    scorer = Meteor()
    try:
        return scorer.compute_score(gts, res)
    finally:
        process = scorer.meteor_p
        process.stdin.close()
        process.kill()
        process.wait()


def _clean_for_meteor(text: str) -> str:
    # METEOR's stdio protocol separates fields with "|||" and reads one line per request
    return " ".join(str(text).replace("|||", " ").split())


def meteor_scores(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
    """METEOR 1.5 (``-l en -norm``) of ``candidates[i]`` against ``references[i]``, all in one Java process.

    Candidates without references score 0 and are not sent to METEOR (docs/upstream/evaluation.md §4: such
    records never enter the dense-captioning mAP). The texts are not PTB-tokenised (METEOR's ``-norm``
    normalises them), as in upstream's dense-captioning evaluator.
    """
    if len(candidates) != len(references):
        raise ValueError(f"got {len(candidates)} candidates but {len(references)} reference lists")
    scores = np.zeros(len(candidates), dtype=np.float64)
    scored = [i for i, refs in enumerate(references) if len(refs) > 0]
    if not scored:
        return scores
    gts = {i: [_clean_for_meteor(ref) for ref in references[i]] for i in scored}
    res = {i: [_clean_for_meteor(candidates[i])] for i in scored}
    _, per_item = _meteor_compute(gts, res)
    scores[scored] = per_item
    return scores


@dataclass(frozen=True)
class CaptionScores:
    """Corpus scores (``scores[name]``, COCOEvalCap's values: fractions, CIDEr 1.0 = "100") and one value
    per key (``per_item[name]``, in the order of ``keys``)."""

    scores: dict[str, float]
    per_item: dict[str, np.ndarray]
    keys: list


def _check_caption_inputs(candidates: Mapping, references: Mapping) -> None:
    if set(candidates) != set(references):
        missing = sorted(map(str, set(references) - set(candidates)))[:3]
        extra = sorted(map(str, set(candidates) - set(references)))[:3]
        raise ValueError(
            f"candidates and references must have the same keys (missing candidates: {missing}, "
            f"candidates without references: {extra})"
        )
    if not candidates:
        raise ValueError("the caption metrics need at least one candidate")
    for key, refs in references.items():
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references[{key!r}] must be a non-empty list of strings")


def caption_scores(
    candidates: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    metrics: Sequence[str] = CAPTION_METRICS,
    tokenize: bool = True,
) -> CaptionScores:
    """COCOEvalCap's caption metrics (without SPICE) of one candidate per key against that key's references.

    Args:
        candidates: key -> the predicted caption.
        references: key -> one or more reference captions (same keys as ``candidates``).
        metrics: which of `CAPTION_METRICS` to compute (METEOR starts a Java process; the others are Python).
        tokenize: PTB-tokenise all texts first (Java), as COCOEvalCap does; ``False`` splits on whitespace.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _check_caption_inputs(candidates, references)
    unknown = sorted(set(metrics) - set(CAPTION_METRICS))
    if unknown:
        raise ValueError(f"unknown caption metrics {unknown}; allowed: {list(CAPTION_METRICS)}")
    keys = list(references)
    gts = {key: [str(text) for text in references[key]] for key in keys}
    res = {key: [str(candidates[key])] for key in keys}
    if tokenize:
        gts, res = ptb_tokenize(gts), ptb_tokenize(res)
    else:
        gts = {key: [" ".join(text.split()) for text in values] for key, values in gts.items()}
        res = {key: [" ".join(text.split()) for text in values] for key, values in res.items()}

    scores: dict[str, float] = {}
    per_item: dict[str, np.ndarray] = {}
    bleu_names = [name for name in CAPTION_METRICS[:4] if name in metrics]
    if bleu_names:
        with contextlib.redirect_stdout(io.StringIO()):  # BleuScorer prints its length statistics
            corpus, items = Bleu(4).compute_score(gts, res, verbose=0)
        for n, name in enumerate(CAPTION_METRICS[:4]):
            if name in bleu_names:
                scores[name], per_item[name] = float(corpus[n]), np.asarray(items[n], dtype=np.float64)
    if "METEOR" in metrics:
        corpus, items = _meteor_compute(gts, res)
        scores["METEOR"], per_item["METEOR"] = float(corpus), np.asarray(items, dtype=np.float64)
    if "ROUGE_L" in metrics:
        corpus, items = Rouge().compute_score(gts, res)
        scores["ROUGE_L"], per_item["ROUGE_L"] = float(corpus), np.asarray(items, dtype=np.float64)
    if "CIDEr" in metrics:
        corpus, items = Cider().compute_score(gts, res)
        scores["CIDEr"], per_item["CIDEr"] = float(corpus), np.asarray(items, dtype=np.float64)
    return CaptionScores(scores=scores, per_item=per_item, keys=keys)


@dataclass(frozen=True)
class CiderResult:
    """``score`` is the corpus CIDEr-D (mean of ``scores``); ``scores`` [N] one value per candidate."""

    score: float
    scores: np.ndarray


def cider_d(
    candidates: Sequence[str], references: Sequence[Sequence[str]], *, tokenize: bool = True
) -> CiderResult:
    """pycocoevalcap's CIDEr-D (n = 4, sigma = 6, document frequencies from these references) of
    ``candidates[i]`` against ``references[i]``; PTB-tokenised first unless ``tokenize=False``.

    Papers, DynRefer's included, print the score x 100.
    """
    if len(candidates) != len(references):
        raise ValueError(f"got {len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("cider_d needs at least one candidate")
    result = caption_scores(
        dict(enumerate(candidates)), dict(enumerate(references)), metrics=("CIDEr",), tokenize=tokenize
    )
    return CiderResult(score=result.scores["CIDEr"], scores=result.per_item["CIDEr"])
