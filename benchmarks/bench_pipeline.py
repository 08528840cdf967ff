"""Regions per second of the ``region-captioning`` pipeline: many regions per call vs one region per call.

The baseline describes one region per call (what single-region captioners such as DAM or a
one-box-per-prompt model require): ``describe(image, boxes=[box])`` for every box. The pipeline then
gets all boxes in one call, with several ``batch_size`` values (regions per forward pass). On CUDA the
peak memory of each setting is reported as well.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_pipeline.py [--model FOLDER] [--regions 40] [--device cpu]``.
Without ``--model`` a tiny random model (``tests/tiny.py``) is saved to a temporary folder: the timings then
measure the pipeline's own overhead more than the network. Prints a table and writes
``benchmarks/results/bench_pipeline_<model>_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import pipeline

import dynrefer_hf  # registers the task; also gives load_rgb_image

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT.parent / "shared" / "data" / "images" / "COCO_val2014_000000000192.jpg"  # 640x480
RESULTS = ROOT / "benchmarks" / "results"


def random_boxes(count: int, width: int, height: int, seed: int = 0) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    boxes = []
    for _ in range(count):
        w, h = rng.uniform(0.05, 0.6) * width, rng.uniform(0.05, 0.6) * height
        x1, y1 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        boxes.append([round(x1), round(y1), round(x1 + w), round(y1 + h)])
    return boxes


def timed(device: torch.device, function) -> tuple[float, float | None]:
    """Seconds and, on CUDA, peak allocated GiB of ``function()``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter() - start, torch.cuda.max_memory_allocated(device) / 2**30
    return time.perf_counter() - start, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model folder or Hub id (default: a tiny random model)")
    parser.add_argument("--regions", type=int, default=40)
    parser.add_argument("--batch-sizes", default="1,5,20,40")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-new-tokens", type=int, default=10)
    args = parser.parse_args()

    model = args.model
    if model is None:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny import save_tiny_region_captioner

        model = save_tiny_region_captioner(tempfile.mkdtemp(prefix="bench_pipeline_"))
    describe = pipeline("region-captioning", model=str(model), device=args.device)
    device = describe.device
    image = dynrefer_hf.pipelines.load_rgb_image(PHOTO)
    boxes = random_boxes(args.regions, *image.size)
    generation = {"max_new_tokens": args.max_new_tokens, "progress_bar": False}
    describe(image, boxes=boxes[:2], **generation)  # warm-up

    rows = []
    seconds, memory = timed(device, lambda: [describe(image, boxes=[box], **generation) for box in boxes])
    rows.append({"setting": "one region per call", "batch_size": 1, "seconds": seconds, "peak_gib": memory})
    for batch_size in (int(value) for value in args.batch_sizes.split(",")):
        seconds, memory = timed(
            device, lambda size=batch_size: describe(image, boxes=boxes, batch_size=size, **generation)
        )
        rows.append(
            {
                "setting": "all regions in one call",
                "batch_size": batch_size,
                "seconds": seconds,
                "peak_gib": memory,
            }
        )
    baseline = rows[0]["seconds"]

    print(f"model {model}, device {device}, {args.regions} regions, max_new_tokens {args.max_new_tokens}")
    print(f"{'setting':<26}{'batch':>6}{'seconds':>10}{'regions/s':>11}{'speed-up':>10}{'peak GiB':>10}")
    for row in rows:
        row["regions_per_second"] = args.regions / row["seconds"]
        row["speed_up"] = baseline / row["seconds"]
        peak = "-" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
        print(
            f"{row['setting']:<26}{row['batch_size']:>6}{row['seconds']:>10.2f}"
            f"{row['regions_per_second']:>11.1f}{row['speed_up']:>9.1f}x{peak:>10}"
        )

    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "tiny" if args.model is None else Path(str(model)).name
    path = RESULTS / f"bench_pipeline_{name}_{device.type}.json"
    environment = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
    }
    path.write_text(
        json.dumps(
            {"model": str(model), "regions": args.regions, "environment": environment, "rows": rows}, indent=2
        )
    )
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
