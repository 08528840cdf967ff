"""The `evaluate` modules shipped in the package, one folder each, loadable offline by path::

    import evaluate
    from dynrefer_hf.metrics import evaluate_module_path

    meteor_cider = evaluate.load(evaluate_module_path("region_captioning"))
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["EVALUATE_MODULES", "evaluate_module_path"]

_ROOT = Path(__file__).resolve().parent / "evaluate_modules"

# name -> what it computes (docs/upstream/evaluation.md section)
EVALUATE_MODULES = {
    "region_captioning": "BLEU-1..4, METEOR, ROUGE-L, CIDEr-D through pycocoevalcap (§3)",
    "dense_captioning_map": "dense-captioning mAP and detection mAP (§4)",
    "ovad_attribute_map": "OVAD attribute mAP with head/medium/tail breakdown (§5)",
    "region_accuracy": "top-1 region recognition accuracy (§6)",
}


def evaluate_module_path(name: str) -> str:
    """The folder of the shipped `evaluate` module ``name`` (one of `EVALUATE_MODULES`), for ``evaluate.load``."""
    if name not in EVALUATE_MODULES:
        raise ValueError(f"unknown evaluate module {name!r}; the package ships {sorted(EVALUATE_MODULES)}")
    return str(_ROOT / name)
