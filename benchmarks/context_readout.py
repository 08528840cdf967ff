"""How much of a region's context can the demonstration model's ViT read from one wider view?

docs/demo_model.md (measurements 8 and 9) asks why the demonstration model does not learn the context words
of its captions (the relation to the nearest shape, that shape's colour and class). This script takes the
ViT alone and gives it the context as a direct target, so that what it reaches bounds what the rest of
DynRefer could get from the representation:

* the demonstration ViT (BLIP-2 vision tower of 4 layers, width 96, 8 px patches on 64 px views,
  sine-cosine position start: `dynrefer_hf.shapes.sincos_position_embeddings`), trained from scratch;
* one view per region, at a fixed ``t`` (`dynrefer_hf.views.view_boxes`), resized to the view size;
* the region's box RoI-aligned on the patch grid (`dynrefer_hf.ops.roi_align`, 4 x 4, averaged) and one
  linear layer predicting the caption's context words (`dynrefer_hf.shapes.context_labels`) and the region's
  own class;
* cross-entropy on the four, AdamW (lr 1e-3, weight decay 0.05) with a one-cycle schedule, 32 regions per
  step drawn at random from the training regions, one torch thread.

No Q-Former, caption, control words or fusion. The runs differ in the view's ``t`` and in the number of
training scenes (the shipped recipe trains on 2400):

    python benchmarks/context_readout.py --jobs 2     # the four runs of docs/demo_model.md; resumable
    python benchmarks/context_readout.py --runs t1_20000scenes    # one of them
    python benchmarks/context_readout.py --geometry   # where the nearest shape lies in the views (seconds)
    python benchmarks/context_readout.py --smoke      # a few steps, to check that the script runs

Every run scores the test split (200 scenes, 1109 regions) every ``--eval-every`` steps and appends the
scores to benchmarks/results/context_readout.csv (the long format of benchmarks/_common.py; metric
``"<word> accuracy at step <n>"``) as they come; a restarted script skips the runs that reached their last
step and starts the others again. At the end it prints the last scores of every run.

Views are cut from the image with a float box and one bicubic resize (PIL), not with the processor's integer
crop: the two differ by under a pixel, and this is 7x faster for the 110,000 views of 20,000 scenes.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from _common import RESULTS, append_results, git_commit, machine_description, read_results, versions
from PIL import Image
from transformers import Blip2VisionConfig, Blip2VisionModel

from dynrefer_hf.ops import roi_align
from dynrefer_hf.shapes import (
    CONTEXT_LABEL_SIZES,
    SHAPES_VOCABULARY,
    context_labels,
    nearest_shape,
    scene_record,
    shapes_scene,
    sincos_position_embeddings,
)
from dynrefer_hf.views import CANDIDATE_RATIOS, view_boxes

BENCHMARK = "context_readout"
WORDS = ("relation", "neighbour_colour", "neighbour_class", "own_class")
LABEL_SIZES = (*CONTEXT_LABEL_SIZES, len(SHAPES_VOCABULARY.classes))
CHANCE = {"relation": 25.0, "neighbour_colour": 100 / 7, "neighbour_class": 100 / 6, "own_class": 100 / 6}
WIDTH = 96
REGIONS_PER_STEP = 32
ROI_SIZE = 4


def accuracy_metric(word: str, step: int) -> str:
    """The results-file metric of ``word``'s test accuracy at ``step``."""
    return f"{word} accuracy at step {step}"


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    t: float
    train_scenes: int
    view_size: int = 64
    patch_size: int = 8
    test_scenes: int = 200
    steps: int = 10_000


RUNS = (
    Run("t0.5_2400scenes", t=0.5, train_scenes=2400),
    Run("t0.5_20000scenes", t=0.5, train_scenes=20_000),
    Run("t1_20000scenes", t=1.0, train_scenes=20_000),
    Run("t0.5_20000scenes_20000steps", t=0.5, train_scenes=20_000, steps=20_000),
)


def region_views(split: str, num_scenes: int, t: float, view_size: int) -> tuple[torch.Tensor, ...]:
    """Every region of the first ``num_scenes`` scenes of ``split``: its view at ``t`` (uint8
    ``[R, S, S, 3]``), its box in that view's pixels (``[R, 4]``) and its labels (``[R, 4]``: `WORDS`)."""
    views, boxes, labels = [], [], []
    for index in range(num_scenes):
        scene = shapes_scene(split, index)
        record = scene_record(scene, image_id=index)
        width, height = scene.image.size
        for box, caption, own_class in zip(record["boxes"], record["captions"], record["classes"]):
            x1, y1, x2, y2 = (float(value) for value in view_boxes(box, [t], width, height)[0])
            views.append(
                np.asarray(scene.image.resize((view_size, view_size), Image.BICUBIC, box=(x1, y1, x2, y2)))
            )
            scale_x, scale_y = view_size / (x2 - x1), view_size / (y2 - y1)
            boxes.append(
                [
                    (box[0] - x1) * scale_x,
                    (box[1] - y1) * scale_y,
                    (box[2] - x1) * scale_x,
                    (box[3] - y1) * scale_y,
                ]
            )
            labels.append([*context_labels(caption), own_class])
    return torch.from_numpy(np.stack(views)), torch.tensor(boxes, dtype=torch.float32), torch.tensor(labels)


def neighbour_geometry(
    num_scenes: int, view_size: int, patch_size: int
) -> list[tuple[str, str, str, float, str]]:
    """Where the nearest shape lies in the views of the candidate grid (t = 0, 0.1, ..., 1) of every test
    region: the smallest t whose view holds it whole, and its shorter side in the pixels of that view and of
    the whole image (t = 1) resized to ``view_size``. Result rows of `BENCHMARK`, variant ``"geometry"``."""
    grid = (0.0, *CANDIDATE_RATIOS)
    half = grid.index(0.5)
    smallest_t, side_in_view, side_in_image, whole_at_half, centre_at_half = [], [], [], [], []
    for index in range(num_scenes):
        scene = shapes_scene("test", index)
        width, height = scene.image.size
        for i, obj in enumerate(scene.objects):
            neighbour = np.array(nearest_shape(scene.objects, i).box, dtype=np.float32)
            views = view_boxes(obj.box, grid, width, height)
            holds = (views[:, :2] <= neighbour[:2]).all(axis=1) & (views[:, 2:] >= neighbour[2:]).all(axis=1)
            first = int(np.argmax(holds))  # t = 1 always holds it
            sides = (neighbour[2:] - neighbour[:2]) * view_size / (views[:, 2:] - views[:, :2])
            centre = (neighbour[:2] + neighbour[2:]) / 2
            whole_at_half.append(holds[half])
            centre_at_half.append(
                bool((views[half, :2] <= centre).all() and (centre <= views[half, 2:]).all())
            )
            smallest_t.append(grid[first])
            side_in_view.append(sides[first].min())
            side_in_image.append(sides[-1].min())
    rows = [
        (BENCHMARK, "geometry", f"smallest t holding the neighbour, {name}", value, "t")
        for name, value in zip(
            ("quartile 1", "median", "quartile 3"), np.percentile(smallest_t, [25, 50, 75])
        )
    ]
    rows += [
        (BENCHMARK, "geometry", "neighbour whole in the t = 0.5 view", 100 * np.mean(whole_at_half), "%"),
        (BENCHMARK, "geometry", "neighbour's centre in the t = 0.5 view", 100 * np.mean(centre_at_half), "%"),
    ]
    for where, sides in (("that view", np.array(side_in_view)), ("the whole image", np.array(side_in_image))):
        rows += [
            (BENCHMARK, "geometry", f"neighbour's shorter side in {where}, median", np.median(sides), "px"),
            (
                BENCHMARK,
                "geometry",
                f"neighbour's shorter side in {where}, under one patch",
                100 * np.mean(sides < patch_size),
                "%",
            ),
            (
                BENCHMARK,
                "geometry",
                f"neighbour's shorter side in {where}, under two patches",
                100 * np.mean(sides < 2 * patch_size),
                "%",
            ),
        ]
    return rows


class ContextReadout(torch.nn.Module):
    """The demonstration ViT, the region's RoI on its patch grid, one linear layer for the four words."""

    def __init__(self, view_size: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.vit = Blip2VisionModel(
            Blip2VisionConfig(
                hidden_size=WIDTH,
                intermediate_size=4 * WIDTH,
                num_hidden_layers=4,
                num_attention_heads=4,
                image_size=view_size,
                patch_size=patch_size,
                layer_norm_eps=1e-6,
                initializer_range=0.02,
            )
        )
        with torch.no_grad():
            self.vit.embeddings.position_embedding.copy_(
                sincos_position_embeddings(view_size // patch_size, WIDTH)[None]
            )
        self.head = torch.nn.Linear(WIDTH, sum(LABEL_SIZES))

    def forward(self, views: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``views`` uint8 ``[R, S, S, 3]``, ``boxes`` ``[R, 4]`` -> one logits tensor ``[R, n]`` per word."""
        pixels = (views.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
        # [R, g*g, WIDTH]: the patch tokens, without the class token
        tokens = self.vit(pixel_values=pixels).last_hidden_state[:, 1:]
        grid = views.shape[1] // self.patch_size
        feature_map = tokens.transpose(1, 2).reshape(len(views), WIDTH, grid, grid)
        rois = torch.cat([torch.arange(len(views), dtype=boxes.dtype)[:, None], boxes], dim=1)
        pooled = roi_align(feature_map, rois, ROI_SIZE, spatial_scale=1 / self.patch_size, sampling_ratio=2)
        return self.head(pooled.mean(dim=(2, 3))).split(LABEL_SIZES, dim=1)


def loss_and_accuracies(
    logits: tuple[torch.Tensor, ...], labels: torch.Tensor
) -> tuple[torch.Tensor, list[float]]:
    loss = sum(torch.nn.functional.cross_entropy(word, labels[:, i]) for i, word in enumerate(logits))
    accuracies = [
        100 * (word.argmax(1) == labels[:, i]).float().mean().item() for i, word in enumerate(logits)
    ]
    return loss, accuracies


def train_and_score(run: Run, eval_every: int, results: Path) -> str:
    """Train ``run``, appending its test scores to ``results`` every ``eval_every`` steps."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    start = time.perf_counter()
    train_views, train_boxes, train_labels = region_views("train", run.train_scenes, run.t, run.view_size)
    test_views, test_boxes, test_labels = region_views("test", run.test_scenes, run.t, run.view_size)
    data_seconds = time.perf_counter() - start
    model = ContextReadout(run.view_size, run.patch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=run.steps)
    context = (git_commit(), versions("torch", "transformers"), machine_description(f"{run.name}, 1 thread"))
    append_results(results, [(BENCHMARK, run.name, "data seconds", data_seconds, "s")], *context)
    start = time.perf_counter()
    for step in range(1, run.steps + 1):
        batch = torch.randint(0, len(train_labels), (REGIONS_PER_STEP,))
        loss, _ = loss_and_accuracies(model(train_views[batch], train_boxes[batch]), train_labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % eval_every == 0 or step == run.steps:
            model.eval()
            with torch.no_grad():
                chunks = [
                    model(test_views[i : i + 256], test_boxes[i : i + 256])
                    for i in range(0, len(test_labels), 256)
                ]
                test_loss, accuracies = loss_and_accuracies(
                    [torch.cat(word) for word in zip(*chunks)], test_labels
                )
            model.train()
            rows = [
                (BENCHMARK, run.name, accuracy_metric(word, step), value, "%")
                for word, value in zip(WORDS, accuracies)
            ]
            rows += [
                (BENCHMARK, run.name, f"test loss at step {step}", test_loss.item(), "nats"),
                (BENCHMARK, run.name, f"training seconds at step {step}", time.perf_counter() - start, "s"),
            ]
            append_results(results, rows, *context)
            print(
                f"{run.name} step {step}: " + ", ".join(f"{w} {a:.1f}" for w, a in zip(WORDS, accuracies)),
                flush=True,
            )
    return run.name


def finished_runs(results: Path) -> set[str]:
    """The runs whose last step's scores are in ``results``."""
    last_steps = {run.name: accuracy_metric(WORDS[-1], run.steps) for run in RUNS}
    return {
        row["variant"] for row in read_results(results) if last_steps.get(row["variant"]) == row["metric"]
    }


def print_table(results: Path, runs: tuple[Run, ...]) -> None:
    rows = read_results(results)
    print("| run | t | training scenes | step | " + " | ".join(WORDS) + " |")
    print("|---|---|---|---|" + "---|" * len(WORDS))
    for run in runs:
        scores = {row["metric"]: float(row["value"]) for row in rows if row["variant"] == run.name}
        steps = [step for step in range(1, run.steps + 1) if accuracy_metric(WORDS[-1], step) in scores]
        if steps:
            step = max(steps)
            words = " | ".join(f"{scores[accuracy_metric(word, step)]:.1f}" for word in WORDS)
            print(f"| {run.name} | {run.t} | {run.train_scenes} | {step} | {words} |")
    print("| chance | | | | " + " | ".join(f"{CHANCE[word]:.1f}" for word in WORDS) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", nargs="+", choices=[run.name for run in RUNS], help="these runs only (default: all)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs side by side (one torch thread each)")
    parser.add_argument("--eval-every", type=int, default=1000, help="steps between test scores")
    parser.add_argument("--smoke", action="store_true", help="20 steps on 20 scenes per run, to its own file")
    parser.add_argument(
        "--geometry",
        action="store_true",
        help="only measure where the nearest shape lies in the views (no training)",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.eval_every < 1:
        parser.error(f"--jobs and --eval-every must be >= 1, got {args.jobs} and {args.eval_every}")
    results = RESULTS / f"{BENCHMARK}.csv"
    if args.geometry:
        rows = neighbour_geometry(RUNS[0].test_scenes, RUNS[0].view_size, RUNS[0].patch_size)
        append_results(results, rows, git_commit(), versions("numpy"), machine_description())
        for _, _, metric, value, unit in rows:
            print(f"{metric}: {value:.1f} {unit}")
        return
    runs = tuple(run for run in RUNS if args.runs is None or run.name in args.runs)
    if args.smoke:
        runs = tuple(dataclasses.replace(run, train_scenes=20, test_scenes=10, steps=20) for run in runs)
        results = RESULTS / f"{BENCHMARK}_smoke.csv"
        results.unlink(missing_ok=True)
    done = finished_runs(results) if not args.smoke else set()
    todo = [run for run in runs if run.name not in done]
    print(f"{len(todo)} runs to do, {len(done)} already in {results}")
    append_results(results, [], git_commit(), "", "")  # the header, before any worker appends
    eval_every = min(args.eval_every, *(run.steps for run in runs))
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for name in pool.map(train_and_score, todo, [eval_every] * len(todo), [results] * len(todo)):
            print(f"{name}: done")
    print_table(results, runs)


if __name__ == "__main__":
    main()
