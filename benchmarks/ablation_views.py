"""The paper's view ablation in miniature, on the synthetic shapes scenes.

The demonstration DynRefer (dynrefer_hf.shapes) is trained and evaluated with six view settings, under
the same budget (the same scenes, steps and model sizes; only the views change), with several seeds each:

    a  tight crop only                        1 view  (t = 0)
    b  tight crop at twice the resolution     1 view  (t = 0), 128 px with 16 px patches (a: 64 px, 8 px patches)
    c  two fixed views                        t = 0 and t = 1 (the region and the whole image), train and test
    d  two random views                       t = 0 plus a random t when training; image prior at inference
    e  three random views, image prior        t = 0 plus two random t when training; image prior at inference
    f  three random views, task prior         the model of (e); task priors at inference: captions with the
                                              "captioning" views, attributes and classes with the "attributes" views

    python benchmarks/ablation_views.py                 # 5 trainings x 2 seeds, about 10 minutes each on 2 cores
    python benchmarks/ablation_views.py --smoke         # a few steps per variant, to check that the script runs

Writes benchmarks/results/ablation_views.json and the table docs/ablation_views.md (the smoke run writes
only benchmarks/results/ablation_views_smoke.json). Scores x 100: caption CIDEr-D (pycocoevalcap's
definition), attribute mAP (OVAD protocol), class accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import multiprocessing
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from dynrefer_hf.shapes import ShapesDemoSettings, evaluate_demo_model, train_demo_model

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("attribute_map", "class_accuracy", "cider_d")
METRIC_TITLES = {
    "attribute_map": "attribute mAP",
    "class_accuracy": "class accuracy",
    "cider_d": "caption CIDEr-D",
}

# name -> (description, changes to the shared settings). (b) keeps the token count of (a): 128 px views with
# 16 px patches (8 x 8 tokens), so it gets twice the pixels at the same compute budget.
VARIANTS = {
    "a": ("tight crop only", {"num_views": 1, "train_view_selection": [], "eval_view_selection": []}),
    "b": (
        "tight crop, 2x resolution",
        {
            "num_views": 1,
            "view_size": 128,
            "patch_size": 16,
            "train_view_selection": [],
            "eval_view_selection": [],
        },
    ),
    "c": (
        "two fixed views (t = 0, 1)",
        {"num_views": 2, "train_view_selection": [1.0], "eval_view_selection": [1.0]},
    ),
    "d": ("two random views, image prior", {"num_views": 2}),
    "e": ("three random views, image prior", {"num_views": 3}),
}
# (f) re-evaluates the model of (e): (metrics, view selection, task) per evaluation.
TASK_PRIOR_EVALUATIONS = (
    (("cider_d",), "task", "captioning"),
    (("attribute_map", "class_accuracy"), "task", "attributes"),
)


def budget(smoke: bool, max_train_minutes: float = 10.0) -> dict:
    """The settings shared by every variant: one training budget."""
    if smoke:
        return {
            "num_train_images": 8,
            "num_test_images": 4,
            "epochs": 1.0,
            "warmup_steps": 1,
            "logging_steps": 1,
            "max_train_minutes": 2.0,
            "eval_batch_images": 4,
        }
    # 1000 steps: 5-10 minutes per training on 2 shared cores.
    return {
        "num_train_images": 2000,
        "num_test_images": 100,
        "epochs": 2.0,
        "max_train_minutes": max_train_minutes,
    }


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_variant(name: str, seed: int, smoke: bool, max_train_minutes: float, threads: int) -> dict[str, dict]:
    """Train variant ``name`` with ``seed`` and return {variant: scores} (variant e also yields f)."""
    torch.set_num_threads(threads)
    log = _log
    description, changes = VARIANTS[name]
    settings = ShapesDemoSettings(**{**budget(smoke, max_train_minutes), **changes, "seed": seed})
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as work_dir:
        run = train_demo_model(settings, work_dir, log=log, show_progress=False)
    evaluation = evaluate_demo_model(run.model, run.processor, run.test_dataset, settings)
    results = {
        name: {**evaluation.percentages(), "train_minutes": run.train_seconds / 60, "steps": run.steps}
    }
    if name == "e":
        scores = {}
        for metrics, selection, task in TASK_PRIOR_EVALUATIONS:
            task_settings = dataclasses.replace(settings, eval_view_selection=selection, eval_task=task)
            percentages = evaluate_demo_model(
                run.model, run.processor, run.test_dataset, task_settings
            ).percentages()
            scores.update({metric: percentages[metric] for metric in metrics})
        results["f"] = {**scores, "train_minutes": run.train_seconds / 60, "steps": run.steps}
    log(
        f"variant {name} ({description}), seed {seed}: "
        + ", ".join(f"{metric} {results[name][metric]:.1f}" for metric in METRICS)
        + f" [{(time.monotonic() - start) / 60:.1f} min]"
    )
    return results


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Mean and standard deviation over seeds of every metric."""
    summary = {}
    for name, seeds in runs.items():
        summary[name] = {
            metric: {
                "mean": float(np.mean([s[metric] for s in seeds])),
                "std": float(np.std([s[metric] for s in seeds])),
                "values": [s[metric] for s in seeds],
            }
            for metric in METRICS
        }
    return summary


def table(summary: dict[str, dict]) -> str:
    descriptions = {
        **{name: text for name, (text, _) in VARIANTS.items()},
        "f": "three random views, task prior (model of e)",
    }
    lines = [
        "| | views | " + " | ".join(METRIC_TITLES[m] for m in METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for name in sorted(summary):
        cells = [f"{summary[name][m]['mean']:.1f} ± {summary[name][m]['std']:.1f}" for m in METRICS]
        lines.append(f"| {name} | {descriptions[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="trainings to run (f comes with e)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny data and a few steps: checks the script runs"
    )
    parser.add_argument(
        "--max-train-minutes", type=float, default=10.0, help="training time cap of every run (the budget)"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="trainings run side by side, each on cores / jobs threads"
    )
    args = parser.parse_args()
    seeds = args.seeds[:1] if args.smoke else args.seeds
    threads = max(1, torch.get_num_threads() // args.jobs)

    runs: dict[str, list[dict]] = {}
    trainings = [(name, seed) for name in args.variants for seed in seeds]
    # Separate processes: each training sets its own thread count and frees its memory when it ends.
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            pool.submit(run_variant, name, seed, args.smoke, args.max_train_minutes, threads)
            for name, seed in trainings
        ]
        for future in futures:
            for variant, scores in future.result().items():
                runs.setdefault(variant, []).append(scores)
    summary = summarise(runs)
    rendered = table(summary)
    print(rendered)

    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "torch": torch.__version__,
        "threads_per_run": threads,
        "budget": budget(args.smoke, args.max_train_minutes),
        "jobs": args.jobs,
        "seeds": seeds,
        "runs": runs,
        "summary": summary,
    }
    results_dir = ROOT / "benchmarks" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    name = "ablation_views_smoke.json" if args.smoke else "ablation_views.json"
    (results_dir / name).write_text(json.dumps(record, indent=2) + "\n")
    if not args.smoke:
        (ROOT / "docs" / "ablation_views.md").write_text(
            "# View ablation on the shapes scenes\n\n"
            "Written by `benchmarks/ablation_views.py` (see its docstring for the variants); mean ± standard "
            f"deviation over seeds {seeds}, scores x 100, test split of {budget(False)['num_test_images']} scenes, "
            f"training capped at {args.max_train_minutes:g} minutes per run, {args.jobs} run(s) side by side.\n\n"
            + rendered
            + "\n"
        )


if __name__ == "__main__":
    main()
