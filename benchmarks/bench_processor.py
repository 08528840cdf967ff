"""DynReferImageProcessor against a literal restatement of upstream's processor, timed interleaved.

Workloads (image prior, 3 views, 224 px; every call gets all the boxes of one image):

* ``coco14x7``: the 14 COCO images of ``tests/fixtures/images``, 7 boxes each: thin (2 px wide),
  sub-pixel (widened to 1 px), touching the border, large, small (12x9 px), the whole image, medium.
* ``photo640x480_{1,10,50}``: 1, 10 or 50 random boxes on one 640x480 photo.

Variants: ``upstream`` (the restatement below), ``dynrefer_hf`` (the library, default threads) and
``dynrefer_hf_1thread`` (``num_threads=1``: the work the library does, without its threads). In each
of ``--rounds`` rounds every variant runs once, in alternating order; best and median wall time, best
CPU time (all threads: the work done, less sensitive to other processes' load than the wall time) and
the speed-ups over ``upstream`` are written to ``benchmarks/results/bench_processor.csv``
(``benchmarks/_common.py`` format) with the machine, load and thread counts. The outputs of all
variants are asserted identical first. ``--profile`` adds where the time goes (cProfile, one thread).

torch runs on one thread, as in upstream's DataLoader workers (``torch.set_num_threads(1)``); NumPy's
BLAS keeps its default (upstream's selection does not use it; the library limits it to one thread
during a call).

Usage: ``python benchmarks/bench_processor.py [--rounds 5] [--profile]``
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

import cv2
import numpy as np
import scipy.fft
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, ROOT, git_commit, interleaved, machine_description, versions, write_results

from dynrefer_hf import DynReferImageProcessor
from dynrefer_hf.image_processing_dynrefer import _thread_count

IMAGES = ROOT / "tests" / "fixtures" / "images"
PHOTO = IMAGES / "COCO_val2014_000000000192.jpg"  # 640x480


# ================================================================================ upstream, restated
# Upstream's DynReferProcessor step by step (docs/upstream/views.md §1-6), written for this benchmark and kept
# apart from the library: nothing in this section uses dynrefer_hf. The pHash runs on OpenCV as
# upstream's does (``upstream``), or with OpenCV replaced by its formulas in NumPy (grey conversion,
# bilinear resize on float32) and SciPy (orthonormal DCT on float32) (``upstream_numpy``, the baseline
# of the figures before issue 13). torchvision's per-crop transforms are the torch operations they run.

UPSTREAM_SIZE = 224
UPSTREAM_T = [(i + 1) / 10 for i in range(10)]
UPSTREAM_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
UPSTREAM_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def upstream_widen(box: list[float], width: int, height: int) -> list[float]:
    """seq2mask's polygon rule: a box at most 1 px wide (high) is made 1 px wide (high)."""
    x1, y1, x2, y2 = box
    if x1 >= x2 - 1 and x2 > 0:
        x1 = x2 - 1
    elif x1 >= x2 - 1 and width - x1 > 0:
        x2 = x1 + 1
    if y1 >= y2 - 1 and y2 > 0:
        y1 = y2 - 1
    elif y1 >= y2 - 1 and height - y1 > 0:
        y2 = y1 + 1
    return [x1, y1, x2, y2]


def opencv_grey(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def opencv_phash(grey: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Crop (box truncated, not clipped), cv2.resize to 224x224, cv2.dct, 8x8 block > its mean."""
    x1, y1, x2, y2 = box.astype(np.int64)
    block = cv2.dct(cv2.resize(grey[y1:y2, x1:x2], (UPSTREAM_SIZE, UPSTREAM_SIZE)))[:8, :8]
    return (block > block.mean()).astype(np.int64).reshape(-1)


def numpy_grey(rgb: np.ndarray) -> np.ndarray:
    """cv2.cvtColor(RGB2GRAY) of OpenCV 4.5.5 on uint8: 14-bit fixed-point BT.601 with rounding."""
    r, g, b = (rgb[..., c].astype(np.int32) for c in range(3))
    return ((r * 4899 + g * 9617 + b * 1868 + 8192) >> 14).astype(np.uint8)


def numpy_linear_axis(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cv2.resize INTER_LINEAR along one axis to 224: float32 source positions, clamped at the borders."""
    position = ((np.arange(UPSTREAM_SIZE) + 0.5) * (size / UPSTREAM_SIZE) - 0.5).astype(np.float32)
    low = np.floor(position).astype(np.int64)
    weight = position - low.astype(np.float32)
    weight[(low < 0) | (low >= size - 1)] = 0
    low = np.clip(low, 0, size - 1)
    return low, np.minimum(low + 1, size - 1), weight


def numpy_phash(grey: np.ndarray, box: np.ndarray) -> np.ndarray:
    """opencv_phash with the resize in NumPy and the DCT in SciPy (float32 both)."""
    x1, y1, x2, y2 = box.astype(np.int64)
    crop = grey[y1:y2, x1:x2]
    rows, cols = numpy_linear_axis(crop.shape[0]), numpy_linear_axis(crop.shape[1])
    across = crop[:, cols[0]] * (1 - cols[2]) + crop[:, cols[1]] * cols[2]
    resized = across[rows[0]] * (1 - rows[2])[:, None] + across[rows[1]] * rows[2][:, None]
    block = scipy.fft.dctn(resized, type=2, norm="ortho")[:8, :8]
    return (block > block.mean()).astype(np.int64).reshape(-1)


def upstream_select(
    image: Image.Image, boxes: list[list[float]], grey_of, phash
) -> tuple[np.ndarray, np.ndarray]:
    """select_regions at inference: 11 hashes per region, greedy ranking of hamming / t, 3 views."""
    width, height = image.size
    grey = grey_of(np.array(image)).astype(np.float32)
    full = np.array([0, 0, width, height], dtype=np.float32)
    view0 = [np.array(box, dtype=np.float32) for box in boxes]
    view0_hashes = [phash(grey, box) for box in view0]
    views, ratios = [], []
    for box, reference in zip(view0, view0_hashes):
        candidates = [box + (full - box) * t for t in UPSTREAM_T]
        hashes = np.stack([phash(grey, candidate) for candidate in candidates])
        scores = (reference[None] ^ hashes).sum(-1) / np.array(UPSTREAM_T)
        picked = []
        for _ in range(2):
            picked.append(int(scores.argmax()))
            scores[picked] = 0
        views.append([box, *(candidates[i] for i in picked)])
        ratios.append([0.0, *(UPSTREAM_T[i] for i in picked)])
    return np.array(views), np.array(ratios)


def upstream_views(
    image: Image.Image, view_boxes: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """cascade_region_process: per view and region, a fresh array of the image, crop, transforms, box map."""
    width, height = image.size
    boxes = torch.from_numpy(view_boxes.transpose(1, 0, 2).copy())  # [V, R, 4]: upstream's order
    boxes[..., 0::2] = boxes[..., 0::2].clip(min=0, max=width)
    boxes[..., 1::2] = boxes[..., 1::2].clip(min=0, max=height)
    boxes = boxes.to(torch.int64)
    pixels, mapped = [], []
    for view in boxes:
        for (x1, y1, x2, y2), target in zip(view.tolist(), boxes[0]):
            crop = Image.fromarray(np.array(image)[y1:y2, x1:x2])
            scale = torch.tensor([UPSTREAM_SIZE / (x2 - x1), UPSTREAM_SIZE / (y2 - y1)] * 2)
            relative = target - torch.tensor([x1, y1, x1, y1])
            if crop.size != (UPSTREAM_SIZE, UPSTREAM_SIZE):
                crop = crop.resize((UPSTREAM_SIZE, UPSTREAM_SIZE), Image.BICUBIC)
                relative = (relative * scale).to(torch.int64)
            tensor = torch.from_numpy(np.array(crop)).permute(2, 0, 1).to(torch.float32).mul_(1 / 255)
            pixels.append(tensor.sub_(UPSTREAM_MEAN).div_(UPSTREAM_STD))
            mapped.append(relative.to(torch.float32))
    num_views, num_regions = boxes.shape[:2]
    pixels = torch.stack(pixels).view(num_views, num_regions, 3, UPSTREAM_SIZE, UPSTREAM_SIZE)
    mapped = torch.stack(mapped).view(num_views, num_regions, 4)
    return pixels.transpose(0, 1), mapped.transpose(0, 1), boxes.transpose(0, 1)


def upstream_process(
    image: Image.Image, boxes: list[list[float]], opencv: bool = True
) -> dict[str, torch.Tensor]:
    """Upstream's processor on one image; ``opencv=False``: the pHash without OpenCV."""
    boxes = [upstream_widen(box, *image.size) for box in boxes]
    views, ratios = upstream_select(
        image, boxes, *((opencv_grey, opencv_phash) if opencv else (numpy_grey, numpy_phash))
    )
    pixels, mapped, crops = upstream_views(image, views)
    return {
        "pixel_values": pixels,
        "view_boxes": mapped,
        "view_ratios": torch.from_numpy(ratios),
        "crop_boxes": crops,
    }


# ======================================================================================= workloads


def coco_boxes(width: int, height: int) -> list[list[float]]:
    """The 7 boxes of the coco14x7 workload for an image of this size."""
    w, h = width, height
    return [
        [0.2 * w, 0.1 * h, 0.2 * w + 2, 0.9 * h],  # thin: 2 px wide
        [0.5 * w + 0.3, 0.5 * h + 0.2, 0.5 * w + 0.7, 0.5 * h + 0.6],  # sub-pixel
        [0.0, 0.3 * h, 0.25 * w, h],  # touching the left and bottom borders
        [0.05 * w, 0.05 * h, 0.95 * w, 0.9 * h],  # large
        [0.6 * w, 0.2 * h, 0.6 * w + 12, 0.2 * h + 9],  # small
        [0.0, 0.0, w, h],  # the whole image
        [0.3 * w, 0.4 * h, 0.7 * w, 0.8 * h],  # medium
    ]


def random_boxes(count: int, width: int, height: int, seed: int = 0) -> list[list[float]]:
    rng = np.random.default_rng(seed)
    boxes = []
    for _ in range(count):
        w, h = rng.uniform(0.05, 0.6) * width, rng.uniform(0.05, 0.6) * height
        x1, y1 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        boxes.append([x1, y1, x1 + w, y1 + h])
    return boxes


def workloads() -> dict[str, list[tuple[Image.Image, list[list[float]]]]]:
    """name -> [(image, its boxes)], one processor call per entry."""
    coco = [Image.open(path).convert("RGB") for path in sorted(IMAGES.glob("*.jpg"))]
    photo = Image.open(PHOTO).convert("RGB")
    found = {"coco14x7": [(image, coco_boxes(*image.size)) for image in coco]}
    for count in (1, 10, 50):
        found[f"photo640x480_{count}"] = [(photo, random_boxes(count, *photo.size))]
    return found


def check_identical(processor: DynReferImageProcessor, calls) -> None:
    """Every variant gives the same views, ratios, boxes and pixels (ratios compared in float32)."""
    for image, boxes in calls:
        for opencv in (True, False):
            expected = upstream_process(image, boxes, opencv=opencv)
            for threads in (1, None):
                got = processor(image, boxes=boxes, num_threads=threads)
                for key, value in expected.items():
                    assert torch.equal(got[key], value.to(got[key].dtype)), (key, image.size, opencv, threads)


PROFILE_GROUPS = {  # cProfile entry (file suffix, function) -> component
    ("~", "<method 'resize' of 'ImagingCore' objects>"): "PIL bicubic resize",
    ("~", "<method 'crop' of 'ImagingCore' objects>"): "PIL crop",
    ("views.py", "_phash_of_grey"): "pHash (library)",
    ("bench_processor.py", "opencv_phash"): "pHash (upstream)",
    ("bench_processor.py", "numpy_phash"): "pHash (upstream)",
    ("~", "<built-in method numpy.array>"): "np.array (upstream's full-image copies)",
}


def profile(function, calls) -> dict[str, float]:
    """Cumulative seconds per component of one pass over ``calls`` (main thread only), and the total."""
    profiler = cProfile.Profile()
    profiler.enable()
    for image, boxes in calls:
        function(image, boxes)
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    found = {"total": max(cumulative for _, _, _, cumulative, _ in stats.values())}
    for (filename, _, name), (_, _, _, cumulative, _) in stats.items():
        for (suffix, wanted), component in PROFILE_GROUPS.items():
            if name == wanted and filename.endswith(suffix):
                found[component] = found.get(component, 0.0) + cumulative
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (default 5)")
    parser.add_argument("--profile", action="store_true", help="also record where the time goes")
    parser.add_argument("--only", nargs="*", help="workload names to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    processor = DynReferImageProcessor()
    view_threads = _thread_count(None)  # the library's default number of view threads here
    threads_note = f"torch threads {torch.get_num_threads()}; OpenCV threads 1; view threads {view_threads}"
    machine = machine_description(threads_note)
    rows = []
    print(machine)
    print(
        f"{'workload':<20} {'variant':<20} {'best s':>8} {'median s':>9} {'cpu s':>7} {'x best':>7} {'x median':>9}"
    )
    for name, calls in workloads().items():
        if args.only and name not in args.only:
            continue
        check_identical(processor, calls)
        variants = {
            "upstream": lambda calls=calls: [upstream_process(image, boxes) for image, boxes in calls],
            "upstream_numpy": lambda calls=calls: [
                upstream_process(image, boxes, opencv=False) for image, boxes in calls
            ],
            "dynrefer_hf": lambda calls=calls: [processor(image, boxes=boxes) for image, boxes in calls],
            "dynrefer_hf_1thread": lambda calls=calls: [
                processor(image, boxes=boxes, num_threads=1) for image, boxes in calls
            ],
        }
        timings = interleaved(variants, args.rounds)
        regions = sum(len(boxes) for _, boxes in calls)
        baseline = timings["upstream"]
        for variant, timing in timings.items():
            speedup_best, speedup_median = baseline.best / timing.best, baseline.median / timing.median
            rows += [
                (name, variant, "wall_best", timing.best, "s"),
                (name, variant, "wall_median", timing.median, "s"),
                (name, variant, "cpu_best", timing.cpu_best, "s"),
                (name, variant, "regions_per_s_best", regions / timing.best, "regions/s"),
                (name, variant, "speedup_best", speedup_best, "x"),
                (name, variant, "speedup_median", speedup_median, "x"),
                (name, variant, "speedup_cpu", baseline.cpu_best / timing.cpu_best, "x"),
                (name, variant, "threads", 1 if variant != "dynrefer_hf" else view_threads, "threads"),
            ]
            print(
                f"{name:<20} {variant:<20} {timing.best:>8.3f} {timing.median:>9.3f} {timing.cpu_best:>7.3f} "
                f"{speedup_best:>6.2f}x {speedup_median:>8.2f}x {baseline.cpu_best / timing.cpu_best:>5.2f}x"
            )
        rows.append((name, "all", "rounds", args.rounds, "rounds"))
        rows.append((name, "all", "regions", regions, "regions"))
        if args.profile:
            library = lambda image, boxes: processor(image, boxes=boxes, num_threads=1)
            upstream_numpy = lambda image, boxes: upstream_process(image, boxes, opencv=False)
            for variant, function in (
                ("upstream", upstream_process),
                ("upstream_numpy", upstream_numpy),
                ("dynrefer_hf_1thread", library),
            ):
                for component, seconds in profile(function, calls).items():
                    rows.append((f"{name}/profile", variant, component, seconds, "s"))
                    print(f"  profile {variant:<20} {component:<22} {seconds:8.3f} s")
    write_results(
        RESULTS / "bench_processor.csv",
        rows,
        git_commit(),
        versions("numpy", "scipy", "torch", "pillow", "opencv-python-headless", "threadpoolctl"),
        machine_description(threads_note),
    )


if __name__ == "__main__":
    main()
