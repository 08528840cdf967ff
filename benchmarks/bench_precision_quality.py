"""What lower precision costs in quality, on the demonstration model's test split (docs/demo_model.md).

    python benchmarks/bench_precision_quality.py [--images 200] [--variants float32,bfloat16,int8,bfloat16_int8]

Each variant loads the shipped demonstration model (``dynrefer_hf.pretrained``) at one precision, predicts the first
``--images`` test scenes with the model's recorded evaluation settings (``evaluate_regions``, as the recorded test
scores were made) and scores them with ``demo_scores``: CIDEr-D, attribute mAP, class accuracy and per-word caption
accuracy (x100). ``caption_agreement`` is the percentage of regions whose caption is exactly float32's. Variants:
``float32``, ``bfloat16``, ``int8`` (torchao int8 weights and dynamic int8 activations over float32) and
``bfloat16_int8`` (the same over bfloat16: what ``--quantize int8`` gives on a CPU with native bfloat16). Writes
``benchmarks/results/bench_precision_quality.csv`` (benchmark ``precision_quality_demo``, variant, metric).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, git_commit, machine_description, versions, write_results

VARIANTS = {
    "float32": ("float32", None),
    "bfloat16": ("bfloat16", None),
    "int8": ("float32", "int8"),
    "bfloat16_int8": ("bfloat16", "int8"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200, help="test scenes (the recorded split has 200)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()

    from transformers import AutoProcessor

    from dynrefer_hf.evaluation import evaluate_regions
    from dynrefer_hf.modeling_dynrefer import DynReferForRegionCaptioning
    from dynrefer_hf.precision import from_pretrained_kwargs
    from dynrefer_hf.pretrained import SHAPES_DEMO_PATH
    from dynrefer_hf.shapes import shapes_split
    from dynrefer_hf.shapes.demo_model import demo_scores

    settings = json.loads((SHAPES_DEMO_PATH / "training_settings.json").read_text())
    dataset = shapes_split("test", args.images, seed=settings["data_seed"])
    processor = AutoProcessor.from_pretrained(SHAPES_DEMO_PATH)
    rows, captions = [], {}
    names = [name.strip() for name in args.variants.split(",")]
    if names[0] != "float32":
        raise SystemExit("--variants must start with float32 (the reference of caption_agreement)")
    print(f"{'variant':<16}{'CIDEr-D':>9}{'attr mAP':>10}{'class':>8}{'words':>8}{'agree':>8}{'s':>7}")
    for name in names:
        precision, quantization = VARIANTS[name]
        model = DynReferForRegionCaptioning.from_pretrained(
            SHAPES_DEMO_PATH, **from_pretrained_kwargs(precision, quantization)
        )
        start = time.perf_counter()
        result = evaluate_regions(
            model,
            processor,
            dataset,
            batch_images=settings["eval_batch_images"],
            view_selection=settings["eval_view_selection"],
            task=settings["eval_task"],
        )
        seconds = time.perf_counter() - start
        scores = demo_scores(result, dataset)
        captions[name] = [prediction["caption"] for prediction in result.predictions]
        scores["caption_agreement"] = (
            100
            * sum(a == b for a, b in zip(captions[name], captions["float32"], strict=True))
            / len(captions[name])
        )
        scores["seconds"] = seconds
        rows += [
            ("precision_quality_demo", name, metric, value, "s" if metric == "seconds" else "x100")
            for metric, value in scores.items()
        ]
        print(
            f"{name:<16}{scores['cider_d']:>9.2f}{scores['attribute_map']:>10.2f}{scores['class_accuracy']:>8.2f}"
            f"{scores['word_all']:>8.2f}{scores['caption_agreement']:>8.1f}{seconds:>7.0f}",
            flush=True,
        )
    write_results(
        RESULTS / "bench_precision_quality.csv",
        rows,
        git_commit(),
        versions("torch", "transformers", "torchao"),
        machine_description(f"{args.images} test scenes of the demonstration model"),
    )


if __name__ == "__main__":
    main()
