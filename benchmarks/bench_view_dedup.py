"""How much vision-tower work identical views save (docs/model.md, `config.deduplicate_views`).

Counts, on the 14 COCO photos of ``tests/fixtures/images`` with ``--regions`` random boxes each, how many of
the R x V views of a call are distinct (only those go through the ViT) for three view selections: upstream's
image prior (the default), the random selection of training (seeded), and a fixed context view
``view_selection=[0.5, 1.0]`` (t = 1 is the whole image, the same view for every region). Then times the
demonstration model's pipeline on ``--timed-images`` of them with the fixed selection, with and without the
deduplication, interleaved (``_common.interleaved``). Prints a table and writes
``benchmarks/results/bench_view_dedup.csv``: benchmark ``view_dedup_<regions>regions``, variants
``<selection>`` (metrics ``views``, ``distinct_views``, ``vit_passes_saved_fraction``) and ``dedup_on`` /
``dedup_off`` (``wall_best``, ``wall_median`` in s; ``speedup_best``).

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_view_dedup.py [--regions 20] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import PIL.Image
from transformers import pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, git_commit, interleaved, machine_description, versions, write_results
from bench_pipeline import random_boxes

import dynrefer_hf  # noqa: F401  (registers the task)
from dynrefer_hf.modeling_view_encoder import unique_views

IMAGES = sorted((ROOT / "tests" / "fixtures" / "images").glob("*.jpg"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--regions", type=int, default=20, help="random boxes per image (one call each)")
    parser.add_argument("--timed-images", type=int, default=3, help="images timed with the demo model")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    describe = pipeline("region-captioning", device="cpu")  # the shipped demonstration model
    image_processor = describe.processor.image_processor
    images = [PIL.Image.open(path).convert("RGB") for path in IMAGES]
    calls = [(image, random_boxes(args.regions, *image.size, seed=index)) for index, image in enumerate(images)]
    selections = {"image_prior": {}, "random": {"view_selection": "random"}, "t_0.5_1.0": {"view_selection": [0.5, 1.0]}}
    benchmark = f"view_dedup_{args.regions}regions"
    rows = []
    for name, selection in selections.items():
        views = distinct = 0
        for index, (image, boxes) in enumerate(calls):
            seed = {"seed": index} if selection.get("view_selection") == "random" else {}
            pixel_values = image_processor(image, boxes=boxes, **selection, **seed)["pixel_values"].flatten(0, 1)
            found = unique_views(pixel_values)
            views += len(pixel_values)
            distinct += len(pixel_values) if found is None else len(found[0])
        rows += [
            (benchmark, name, "views", views, "count"),
            (benchmark, name, "distinct_views", distinct, "count"),
            (benchmark, name, "vit_passes_saved_fraction", 1 - distinct / views, "fraction"),
        ]
        print(f"{name:12s} {views} views, {distinct} distinct: {1 - distinct / views:.1%} of the ViT passes saved")

    config = describe.model.config
    timed = calls[: args.timed_images]

    def run(dedup: bool):
        def call():
            config.deduplicate_views = dedup
            for image, boxes in timed:
                describe(image, boxes=boxes, batch_size=args.regions, view_selection=[0.5, 1.0])

        return call

    timings = interleaved({"dedup_on": run(True), "dedup_off": run(False)}, rounds=args.rounds)
    config.deduplicate_views = True
    for name, timing in timings.items():
        rows += [(benchmark, name, "wall_best", timing.best, "s"), (benchmark, name, "wall_median", timing.median, "s")]
    rows.append((benchmark, "dedup_on", "speedup_best", timings["dedup_off"].best / timings["dedup_on"].best, "x"))
    machine = machine_description(
        f"demo model, view_selection [0.5, 1.0], {len(timed)} images x {args.regions} regions per timed round"
    )
    for name, timing in timings.items():
        print(f"{name:10s} best {timing.best:7.2f} s  median {timing.median:7.2f} s")
    print(f"speedup (best): {timings['dedup_off'].best / timings['dedup_on'].best:.2f}x  [{machine}]")
    write_results(
        RESULTS / "bench_view_dedup.csv", rows, git_commit(), versions("torch", "transformers"), machine
    )


if __name__ == "__main__":
    main()
