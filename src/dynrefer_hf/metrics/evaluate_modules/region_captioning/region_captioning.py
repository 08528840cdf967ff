"""`evaluate` module: region-captioning metrics as COCOEvalCap computes them (docs/upstream/evaluation.md §3)."""

import datasets
import evaluate
from dynrefer_hf.metrics.captioning import CAPTION_METRICS
from dynrefer_hf.metrics.captioning import caption_scores

_DESCRIPTION = """pycocoevalcap's caption metrics without SPICE: PTB tokenisation (Java), BLEU-1..4, METEOR 1.5
(Java), ROUGE-L and CIDEr-D. One prediction and one or more references per region. Values are fractions;
papers print METEOR and CIDEr x 100."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: one caption per region.
    references: per region, a list of reference captions.
    metrics: subset of ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr").
    tokenize: PTB-tokenise first (default True).
Returns:
    {metric name: corpus score}
Example:
    >>> metric = evaluate.load(dynrefer_hf.metrics.evaluate_module_path("region_captioning"))
    >>> metric.compute(predictions=["a red circle"], references=[["a red circle"]], metrics=["CIDEr"])
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RegionCaptioning(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references, metrics=CAPTION_METRICS, tokenize=True):
        result = caption_scores(
            dict(enumerate(predictions)), dict(enumerate(references)), metrics=metrics, tokenize=tokenize
        )
        return result.scores
