"""The paper's view ablation in miniature, on the synthetic shapes scenes.

The demonstration DynRefer (dynrefer_hf.shapes, the shipped recipe: 64 px views, 8 px patches) is
trained with five view settings, every one for the same number of optimizer steps on the same scenes, with
several seeds each, and evaluated on the test split; two more rows re-evaluate the model of (e):

    a  tight crop only                        1 view  (t = 0)
    b  tight crop at twice the resolution     1 view  (t = 0), 128 px with 16 px patches (a: 64 px, 8 px)
    c  two fixed views                        t = 0 and t = 1 (the region and the whole image), train and test
    d  two random views                       t = 0 plus a random t when training; image prior at inference
    e  three random views, image prior        t = 0 plus two random t when training; image prior at inference
    f  three random views, task prior         the model of (e); task priors at inference: captions with the
                                              "captioning" views, attributes and classes with the "attributes" views
    g  three random views, wide fixed views   the model of (e); t = 0, 0.5, 1 at inference (the shipped setting)

    python benchmarks/ablation_views.py --jobs 2        # 5 trainings x 3 seeds, one torch thread per training
    python benchmarks/ablation_views.py --smoke         # a few steps per variant, to check that the script runs

Every training scores the validation scenes every ``--validation-steps`` steps (the curves). Each run's result
is written to benchmarks/results/ablation_views.json as soon as it finishes, and a restarted script skips the
runs already there (with the same budget), so it can be stopped and resumed. After every run it redraws
docs/images/ablation_views_curves.png and the tables between the markers of docs/ablation_views.md (the
reading around them is written by hand). The smoke run writes only benchmarks/results/ablation_views_smoke.json
and .png.
Scores x 100: caption CIDEr-D (pycocoevalcap's definition), attribute mAP (OVAD protocol), class accuracy,
and the accuracy of each word of the captions (`dynrefer_hf.shapes.caption_field_accuracy`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import multiprocessing
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

from dynrefer_hf.shapes import (
    CAPTION_FIELDS,
    CONTEXT_FIELDS,
    ShapesDemoSettings,
    demo_scores,
    evaluate_demo_model,
    train_demo_model,
)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "ablation_views.md"
PLOT = ROOT / "docs" / "images" / "ablation_views_curves.png"
TABLE_START, TABLE_END = "<!-- ablation tables: start (written by benchmarks/ablation_views.py) -->", (
    "<!-- ablation tables: end -->"
)

OWN_FIELDS = tuple(name for name in CAPTION_FIELDS if name not in CONTEXT_FIELDS)
SUMMARY_METRICS = ("cider_d", "attribute_map", "class_accuracy", "own_words", "context_words")
METRIC_TITLES = {
    "cider_d": "caption CIDEr-D",
    "attribute_map": "attribute mAP",
    "class_accuracy": "class accuracy",
    "own_words": "own words",
    "context_words": "context words",
    **{f"word_{name}": name.replace("_", " ") for name in CAPTION_FIELDS},
}

# name -> (description, changes to the shared settings). (b) keeps the token count of (a): 128 px views with
# 16 px patches (8 x 8 tokens), so it gets twice the pixels per side at the same compute in the ViT.
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
    "d": (
        "two random views, image prior",
        {"num_views": 2, "train_view_selection": "random", "eval_view_selection": "image_prior"},
    ),
    "e": (
        "three random views, image prior",
        {"num_views": 3, "train_view_selection": "random", "eval_view_selection": "image_prior"},
    ),
}
# Rows that re-evaluate the model of (e): name -> (description, [(metrics or None = all, selection, task)]).
REEVALUATIONS = {
    "f": (
        "three random views, task prior (model of e)",
        [
            (("cider_d", *(f"word_{name}" for name in CAPTION_FIELDS)), "task", "captioning"),
            (("attribute_map", "class_accuracy"), "task", "attributes"),
        ],
    ),
    "g": ("three random views, fixed t = 0.5, 1 (model of e)", [(None, [0.5, 1.0], None)]),
}
DESCRIPTIONS = {**{name: text for name, (text, _) in VARIANTS.items()}, **{n: t for n, (t, _) in REEVALUATIONS.items()}}


def budget(smoke: bool, steps: int, validation_steps: int) -> dict:
    """The settings shared by every variant: the same scenes and the same number of optimizer steps."""
    if smoke:
        return {
            "num_train_images": 8,
            "num_test_images": 4,
            "num_validation_images": 3,
            "epochs": 1.0,
            "warmup_steps": 1,
            "logging_steps": 1,
            "validation_steps": 1,
            "eval_batch_images": 4,
        }
    num_train_images = ShapesDemoSettings.num_train_images
    steps_per_epoch = math.ceil(num_train_images / ShapesDemoSettings.batch_images)
    return {
        "num_train_images": num_train_images,
        "num_test_images": 200,
        "num_validation_images": 50,
        "epochs": steps / steps_per_epoch,
        "validation_steps": validation_steps,
        "max_train_minutes": 24 * 60.0,  # no wall-clock cap: every variant trains for the same steps
    }


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _with_summaries(scores: dict) -> dict:
    """``scores`` plus ``own_words`` / ``context_words``: the mean accuracy of those caption words."""
    if f"word_{CAPTION_FIELDS[0]}" not in scores:
        return scores
    return {
        **scores,
        "own_words": float(np.mean([scores[f"word_{name}"] for name in OWN_FIELDS])),
        "context_words": float(np.mean([scores[f"word_{name}"] for name in CONTEXT_FIELDS])),
    }


def run_variant(name: str, seed: int, shared: dict, threads: int) -> dict[str, dict]:
    """Train variant ``name`` with ``seed``; returns {row: result} (variant e also yields rows f and g)."""
    torch.set_num_threads(threads)
    description, changes = VARIANTS[name]
    settings = ShapesDemoSettings(**{**shared, **changes, "seed": seed})
    start = time.monotonic()
    with tempfile.TemporaryDirectory() as work_dir:
        run = train_demo_model(settings, work_dir, log=lambda message: None, show_progress=False)
    facts = {"train_minutes": run.train_seconds / 60, "steps": run.steps, "seed": seed}
    curve = [_with_summaries(entry) for entry in run.validation_curve]
    evaluation = evaluate_demo_model(run.model, run.processor, run.test_dataset, settings)
    results = {name: {**_with_summaries(demo_scores(evaluation, run.test_dataset)), **facts, "curve": curve}}
    if name == "e":
        for row, (_, evaluations) in REEVALUATIONS.items():
            scores = {}
            for metrics, selection, task in evaluations:
                row_settings = dataclasses.replace(settings, eval_view_selection=selection, eval_task=task)
                evaluated = demo_scores(
                    evaluate_demo_model(run.model, run.processor, run.test_dataset, row_settings), run.test_dataset
                )
                scores.update(evaluated if metrics is None else {m: evaluated[m] for m in metrics})
            results[row] = {**_with_summaries(scores), **facts}
    _log(
        f"variant {name} ({description}), seed {seed}: "
        + ", ".join(f"{m} {results[name][m]:.1f}" for m in SUMMARY_METRICS)
        + f" [{(time.monotonic() - start) / 60:.1f} min]"
    )
    return results


def summarise(runs: dict[str, dict]) -> dict[str, dict]:
    """Per row: mean, standard deviation (ddof 1; 0 with one seed) and the values of every metric over seeds."""
    rows: dict[str, list[dict]] = {}
    for key in sorted(runs):
        row = key.split("/")[0]
        rows.setdefault(row, []).append(runs[key])
    summary = {}
    for row, seeds in rows.items():
        metrics = [m for m in METRIC_TITLES if all(m in s for s in seeds)]
        summary[row] = {
            metric: {
                "mean": float(np.mean(values)),
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                "values": values,
            }
            for metric in metrics
            for values in [[s[metric] for s in seeds]]
        }
        summary[row]["seeds"] = [s["seed"] for s in seeds]
    return summary


def _cell(summary_row: dict, metric: str) -> str:
    if metric not in summary_row:
        return "–"
    entry = summary_row[metric]
    return f"{entry['mean']:.1f} ± {entry['std']:.1f}"


def tables(summary: dict[str, dict]) -> str:
    def render(metrics) -> list[str]:
        lines = [
            "| | views | seeds | " + " | ".join(METRIC_TITLES[m] for m in metrics) + " |",
            "|---|---|---|" + "---|" * len(metrics),
        ]
        for row in sorted(summary):
            cells = [_cell(summary[row], m) for m in metrics]
            lines.append(f"| {row} | {DESCRIPTIONS[row]} | {len(summary[row]['seeds'])} | " + " | ".join(cells) + " |")
        return lines

    word_metrics = [f"word_{name}" for name in CAPTION_FIELDS]
    return "\n".join(
        [
            (
                "Scores x 100 on the test split, mean ± standard deviation over the seeds (sample std; 0 with one "
                f"seed). Own words: mean accuracy of {', '.join(OWN_FIELDS)}; context words: of "
                f"{', '.join(CONTEXT_FIELDS)} (chance: 25, 14, 17)."
            ),
            "",
            *render(SUMMARY_METRICS),
            "",
            "Accuracy of each caption word (x 100):",
            "",
            *render(word_metrics),
        ]
    )


def plot_curves(runs: dict[str, dict], path: Path) -> None:
    """Validation CIDEr-D, own-word and context-word accuracy against the step, one line per trained variant
    (mean over its seeds; the band spans the seeds' min and max)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("cider_d", "validation CIDEr-D"), ("own_words", "own words (%)"), ("context_words", "context words (%)"))
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), constrained_layout=True)
    for name in VARIANTS:
        curves = [runs[key]["curve"] for key in sorted(runs) if key.split("/")[0] == name and runs[key].get("curve")]
        if not curves:
            continue
        length = min(len(curve) for curve in curves)
        steps = [entry["step"] for entry in curves[0][:length]]
        for axis, (metric, title) in zip(axes, panels):
            values = np.array([[entry[metric] for entry in curve[:length]] for curve in curves])
            (line,) = axis.plot(steps, values.mean(axis=0), label=f"{name}: {DESCRIPTIONS[name]} ({len(curves)} seeds)")
            axis.fill_between(steps, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2)
            axis.set_title(title)
            axis.set_xlabel("optimizer step")
    axes[0].legend(fontsize=7, loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_doc(summary: dict, record: dict) -> None:
    """Replace the generated part of docs/ablation_views.md (between the markers) with the current tables."""
    done = sum(len(summary[row]["seeds"]) for row in VARIANTS if row in summary)
    planned = len(record["variants"]) * len(record["seeds"])
    generated = "\n".join(
        [
            TABLE_START,
            (
                f"Results file: `benchmarks/results/ablation_views.json` ({done} of {planned} trainings done, "
                f"{record['steps']} optimizer steps each, seeds {record['seeds']}, {record['threads_per_run']} "
                f"torch thread(s) per training, {record['jobs']} side by side; updated {record['updated']}). "
                "Validation curves: `docs/images/ablation_views_curves.png`."
            ),
            "",
            tables(summary),
            TABLE_END,
        ]
    )
    text = DOC.read_text() if DOC.exists() else "# View ablation on the shapes scenes\n\n"
    if TABLE_START in text and TABLE_END in text:
        before, rest = text.split(TABLE_START, 1)
        after = rest.split(TABLE_END, 1)[1]
        text = before + generated + after
    else:
        text = text.rstrip("\n") + "\n\n" + generated + "\n"
    DOC.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="trainings to run (f, g come with e)"
    )
    parser.add_argument("--steps", type=int, default=2400, help="optimizer steps of every training (default: %(default)s)")
    parser.add_argument(
        "--validation-steps", type=int, default=200, help="score the validation scenes every this many steps"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny data and a few steps: checks the script runs")
    parser.add_argument("--jobs", type=int, default=1, help="trainings run side by side")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each training (default: %(default)s)")
    args = parser.parse_args()
    for option in ("steps", "validation_steps", "jobs", "threads"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1, got {getattr(args, option)}")
    seeds = args.seeds[:1] if args.smoke else args.seeds
    shared = budget(args.smoke, args.steps, args.validation_steps)
    results_path = RESULTS / ("ablation_views_smoke.json" if args.smoke else "ablation_views.json")

    record = {"budget": shared, "steps": args.steps, "runs": {}}
    if results_path.exists() and not args.smoke:
        stored = json.loads(results_path.read_text())
        if stored.get("budget") != shared:
            sys.exit(
                f"{results_path} holds runs of another budget ({stored.get('budget')}); move it away to start over"
            )
        record = stored
    record.update(
        machine=platform.platform(),
        torch=torch.__version__,
        threads_per_run=args.threads,
        jobs=args.jobs,
        seeds=sorted(set(seeds) | set(record.get("seeds", []))),
        variants=sorted(set(args.variants) | set(record.get("variants", []))),
    )
    # Seed by seed, the contrast first: (e) (which also gives f and g) and (a), then the others.
    order = sorted(args.variants, key=lambda name: ("e", "a", "c", "d", "b").index(name))
    todo = [(name, seed) for seed in seeds for name in order if f"{name}/{seed}" not in record["runs"]]
    _log(f"{len(todo)} trainings to run, {len(record['runs'])} results already in {results_path}")
    # Separate processes: each training sets its own thread count and frees its memory when it ends.
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_variant, name, seed, shared, args.threads) for name, seed in todo]
        for future in as_completed(futures):
            for row, result in future.result().items():
                record["runs"][f"{row}/{result['seed']}"] = result
            record["updated"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            record["summary"] = summarise(record["runs"])
            results_path.parent.mkdir(parents=True, exist_ok=True)
            results_path.write_text(json.dumps(record, indent=2) + "\n")
            if args.smoke:
                plot_curves(record["runs"], RESULTS / "ablation_views_smoke.png")
            else:
                write_doc(record["summary"], record)
                plot_curves(record["runs"], PLOT)
    print(tables(summarise(record["runs"])) if record["runs"] else "no run")


if __name__ == "__main__":
    main()
