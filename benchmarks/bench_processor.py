"""Regions per second of DynReferImageProcessor against a literal transcription of upstream's steps.

The baseline follows upstream ``DynReferProcessor`` step by step, without OpenCV: grey image once per
image, then for every region and each of its 11 boxes (view 0 and the 10 candidates) a full 224x224
bilinear resize and a full 224x224 DCT (``scipy.fft.dctn``) before keeping the 8x8 block; then for every
view a fresh ``np.array(image)``, the crop, PIL bicubic resize and normalisation, one crop at a time.
The processor computes only the 8x8 DCT block of each candidate (two small matrix products), converts
the image to grey once and resizes each distinct crop once.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/bench_processor.py [--repeats 3]``. Prints a table and writes
``benchmarks/results/bench_processor.{csv,json}``.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import platform
import time
from pathlib import Path

import numpy as np
import scipy.fft
import torch
from PIL import Image

from dynrefer_hf import DynReferImageProcessor
from dynrefer_hf.views import (
    CANDIDATE_RATIOS,
    _opencv_linear_taps,
    crop_boxes_from_view_boxes,
    greedy_select_indices,
    image_prior_ratios,
    region_phash,
    rgb_to_grey,
    target_boxes_in_views,
    view_boxes,
)

ROOT = Path(__file__).resolve().parents[1]
PHOTO = ROOT.parent / "shared" / "data" / "images" / "COCO_val2014_000000000192.jpg"  # 640x480
RESULTS = ROOT / "benchmarks" / "results"
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def _baseline_phash(grey: np.ndarray, box: np.ndarray) -> np.ndarray:
    x1, y1, x2, y2 = box.astype(np.int64)
    crop = grey[y1:y2, x1:x2]
    rows = _opencv_linear_taps(crop.shape[0], 224)
    cols = _opencv_linear_taps(crop.shape[1], 224)
    horizontal = crop[:, cols[0]] * cols[2] + crop[:, cols[1]] * cols[3]
    resized = horizontal[rows[0]] * rows[2][:, None] + horizontal[rows[1]] * rows[3][:, None]
    block = scipy.fft.dctn(resized, type=2, norm="ortho")[:8, :8]
    return (block > block.mean()).astype(np.int8).ravel()


def baseline_select(
    image: Image.Image, boxes: list[list[float]]
) -> tuple[list[np.ndarray], list[list[float]]]:
    """Upstream's ``select_regions``, literally (3 views, image prior): 11 full resizes and DCTs per region."""
    width, height = image.size
    grey = rgb_to_grey(np.array(image)).astype(np.float32)
    all_views, all_ratios = [], []
    for box in boxes:
        grid = [0.0, *CANDIDATE_RATIOS]
        candidates = view_boxes(box, grid, width, height)
        hashes = np.stack([_baseline_phash(grey, b) for b in candidates])
        scores = (hashes[0] ^ hashes[1:]).sum(-1) / np.array(CANDIDATE_RATIOS)
        picked = [0] + [i + 1 for i in greedy_select_indices(scores, 2)]
        all_views.append(candidates[picked])
        all_ratios.append([grid[i] for i in picked])
    return all_views, all_ratios


def fast_select(image: Image.Image, boxes: list[list[float]]) -> list[list[float]]:
    """The library's selection alone: grey once, 8x8 DCT block only."""
    grey = rgb_to_grey(np.asarray(image))
    box_hash = functools.partial(region_phash, grey)
    return [image_prior_ratios(box_hash, box, *image.size)[0] for box in boxes]


def baseline_process(image: Image.Image, boxes: list[list[float]]) -> dict[str, torch.Tensor]:
    """Upstream's per-region loop, literally: selection, then one crop at a time from a fresh array."""
    width, height = image.size
    all_views, all_ratios = baseline_select(image, boxes)
    pixels, mapped, crops = [], [], []
    for views in all_views:
        crop_boxes = crop_boxes_from_view_boxes(views, width, height)
        for x1, y1, x2, y2 in crop_boxes.tolist():
            crop = Image.fromarray(np.array(image)[y1:y2, x1:x2])
            if crop.size != (224, 224):
                crop = crop.resize((224, 224), Image.BICUBIC)
            tensor = torch.from_numpy(np.array(crop)).permute(2, 0, 1).to(torch.float32).mul_(1 / 255)
            pixels.append(tensor.sub_(CLIP_MEAN).div_(CLIP_STD))
        mapped.append(target_boxes_in_views(crop_boxes[0], crop_boxes, 224, 224))
        crops.append(crop_boxes)
    return {
        "pixel_values": torch.stack(pixels).view(len(boxes), 3, 3, 224, 224),
        "view_boxes": torch.from_numpy(np.stack(mapped)),
        "view_ratios": torch.tensor(all_ratios, dtype=torch.float32),
        "crop_boxes": torch.from_numpy(np.stack(crops)),
    }


def random_boxes(count: int, width: int, height: int, seed: int = 0) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    boxes = []
    for _ in range(count):
        w, h = rng.uniform(0.05, 0.6) * width, rng.uniform(0.05, 0.6) * height
        x1, y1 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        boxes.append([x1, y1, x1 + w, y1 + h])
    return boxes


def best_time(repeats: int, function, *args, **kwargs) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    image = Image.open(PHOTO).convert("RGB")
    processor = DynReferImageProcessor()
    rows = []
    for count in (1, 10, 50):
        boxes = random_boxes(count, *image.size)
        fast, slow = processor(image, boxes=boxes), baseline_process(image, boxes)
        for key, value in slow.items():  # same views, same pixels
            assert torch.equal(fast[key], value), key
        assert fast_select(image, boxes) == baseline_select(image, boxes)[1]
        baseline_s = best_time(args.repeats, baseline_process, image, boxes)
        processor_s = best_time(args.repeats, processor, image, boxes=boxes)
        baseline_select_s = best_time(args.repeats, baseline_select, image, boxes)
        select_s = best_time(args.repeats, fast_select, image, boxes)
        rows.append(
            {
                "boxes_per_image": count,
                "baseline_regions_per_s": round(count / baseline_s, 2),
                "processor_regions_per_s": round(count / processor_s, 2),
                "speedup": round(baseline_s / processor_s, 2),
                "baseline_selection_regions_per_s": round(count / baseline_select_s, 2),
                "selection_regions_per_s": round(count / select_s, 2),
                "selection_speedup": round(baseline_select_s / select_s, 2),
            }
        )
    print(
        f"DynReferImageProcessor on a {image.size[0]}x{image.size[1]} photo, 3 views, image prior, best of {args.repeats}"
    )
    print(
        f"{'':>12} {'---- whole processor (regions/s) ----':>40} {'---- pHash view selection only ----':>38}"
    )
    print(
        f"{'boxes/image':>12} {'baseline':>12} {'processor':>12} {'speed-up':>14} {'baseline':>12} {'library':>12} {'speed-up':>12}"
    )
    for row in rows:
        print(
            f"{row['boxes_per_image']:>12} {row['baseline_regions_per_s']:>12.1f} {row['processor_regions_per_s']:>12.1f} "
            f"{row['speedup']:>13.1f}x {row['baseline_selection_regions_per_s']:>12.1f} "
            f"{row['selection_regions_per_s']:>12.1f} {row['selection_speedup']:>11.1f}x"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "bench_processor.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    meta = {
        "photo": PHOTO.name,
        "image_size": list(image.size),
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "rows": rows,
    }
    (RESULTS / "bench_processor.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
