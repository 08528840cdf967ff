"""Regions per second of the ``region-captioning`` pipeline: many regions per call vs one region per call.

The baseline describes one region per call (what single-region captioners such as DAM or a
one-box-per-prompt model require): ``describe(image, boxes=[box])`` for every box. The pipeline then
gets all boxes in one call, with several ``batch_size`` values (regions per forward pass). The settings are
timed interleaved (``benchmarks/_common.py``: one warm-up round, then ``--rounds`` rounds running every
setting once, in alternating order); on CUDA the peak memory of each setting is measured in one more run.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_pipeline.py [--model FOLDER] [--regions 40] [--device cpu]``.
Without ``--model`` a tiny random model (``tests/tiny.py``) is saved to a temporary folder: the timings then
measure the pipeline's own overhead more than the network; ``--model shapes-demo`` takes the packaged
demonstration model. The image is the 640x480 COCO photo of ``tests/fixtures/images``. Prints a table and
writes ``benchmarks/results/bench_pipeline_<model>_<device>.csv`` (``_common.write_results``): benchmark
``pipeline_<model>_<device>_<regions>regions``, variant ``one_region_per_call`` or ``batch_size_<n>``, metrics
``wall_best``/``wall_median``/``cpu_best`` (s), ``regions_per_s_best``, ``speedup_best``/``speedup_median``
(x over one region per call) and, on CUDA, ``peak_memory`` (GiB).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, git_commit, interleaved, machine_description, versions, write_results

from dynrefer_hf.images import load_rgb_image  # importing dynrefer_hf registers the task
from dynrefer_hf.pretrained import SHAPES_DEMO_PATH

PHOTO = ROOT / "tests" / "fixtures" / "images" / "COCO_val2014_000000000192.jpg"  # 640x480


def random_boxes(count: int, width: int, height: int, seed: int = 0) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    boxes = []
    for _ in range(count):
        w, h = rng.uniform(0.05, 0.6) * width, rng.uniform(0.05, 0.6) * height
        x1, y1 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        boxes.append([round(x1), round(y1), round(x1 + w), round(y1 + h)])
    return boxes


def peak_memory_gib(device: torch.device, function) -> float:
    """Peak allocated GiB of one run of ``function()`` on CUDA."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    function()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", help="model folder, Hub id or 'shapes-demo' (default: a tiny random model)"
    )
    parser.add_argument("--regions", type=int, default=40)
    parser.add_argument("--batch-sizes", default="1,5,20,40")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-new-tokens", type=int, default=10)
    args = parser.parse_args()

    model = SHAPES_DEMO_PATH if args.model == "shapes-demo" else args.model
    if model is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import save_tiny_region_captioner

        model = save_tiny_region_captioner(tempfile.mkdtemp(prefix="bench_pipeline_"))
    describe = pipeline("region-captioning", model=str(model), device=args.device)
    device = describe.device
    image = load_rgb_image(PHOTO)
    boxes = random_boxes(args.regions, *image.size)
    generation = {"max_new_tokens": args.max_new_tokens, "progress_bar": False}

    def synchronized(function):
        def run():
            function()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        return run

    settings = {
        "one_region_per_call": synchronized(lambda: [describe(image, boxes=[b], **generation) for b in boxes])
    }
    for batch_size in (int(value) for value in args.batch_sizes.split(",")):
        settings[f"batch_size_{batch_size}"] = synchronized(
            lambda size=batch_size: describe(image, boxes=boxes, batch_size=size, **generation)
        )
    timings = interleaved(settings, rounds=args.rounds, warmup=1)
    peaks = (
        {name: peak_memory_gib(device, run) for name, run in settings.items()}
        if device.type == "cuda"
        else {}
    )

    name = "tiny" if args.model is None else Path(str(model)).name
    benchmark = f"pipeline_{name}_{device.type}_{args.regions}regions"
    baseline = timings["one_region_per_call"]
    print(f"model {model}, device {device}, {args.regions} regions, max_new_tokens {args.max_new_tokens}")
    print(f"{'setting':<22}{'best s':>9}{'median s':>10}{'regions/s':>11}{'speed-up':>10}{'peak GiB':>10}")
    rows = []
    for setting, timing in timings.items():
        rows += [
            (benchmark, setting, "wall_best", timing.best, "s"),
            (benchmark, setting, "wall_median", timing.median, "s"),
            (benchmark, setting, "cpu_best", timing.cpu_best, "s"),
            (benchmark, setting, "regions_per_s_best", args.regions / timing.best, "regions/s"),
            (benchmark, setting, "speedup_best", baseline.best / timing.best, "x"),
            (benchmark, setting, "speedup_median", baseline.median / timing.median, "x"),
        ]
        if setting in peaks:
            rows.append((benchmark, setting, "peak_memory", peaks[setting], "GiB"))
        peak = f"{peaks[setting]:.2f}" if setting in peaks else "-"
        print(
            f"{setting:<22}{timing.best:>9.2f}{timing.median:>10.2f}{args.regions / timing.best:>11.1f}"
            f"{baseline.best / timing.best:>9.1f}x{peak:>10}"
        )

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    machine = machine_description(f"{gpu}; torch threads {torch.get_num_threads()}")
    path = RESULTS / f"bench_pipeline_{name}_{device.type}.csv"
    write_results(path, rows, git_commit(), versions("torch", "transformers"), machine)
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
