"""Nested views around a region, as upstream DynRefer builds them (spec views.md).

For a region box ``b`` in an image of size ``(W, H)`` the view for a coefficient ``t`` is the
float32 interpolation ``b + ((0, 0, W, H) - b) * t``: ``t = 0`` is the tight box, ``t = 1`` the
whole image. View 0 is always the tight box; the other views are chosen

* at inference by the *image prior*: the upstream perceptual hash (pHash) of every candidate view is
  compared with the hash of view 0 and the candidates are ranked greedily by
  ``hamming distance / t`` (:func:`image_prior_ratios`; :func:`select_image_prior_ratios` gives the
  same choice without hashing candidates that can no longer be picked);
* in training at random (:func:`random_ratios`);
* or from a fixed, task-dependent set of ``t`` (:data:`TASK_PRIOR_RATIOS`, from the paper; the
  released code does not use them).

Everything here is a pure NumPy/PIL function. The upstream pHash (OpenCV grey conversion, bilinear
resize to 224x224, orthonormal DCT, 8x8 block, mean threshold) is reproduced bit for bit without
OpenCV, and only the 8x8 block of the DCT is computed: resize and DCT are both linear maps, so for a
crop ``C`` the block is ``A_y @ C @ A_x.T`` with small precomputed ``(8, h)`` and ``(8, w)`` matrices.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from functools import lru_cache, partial

import numpy as np
from PIL import Image

__all__ = [
    "CANDIDATE_RATIOS",
    "PHASH_RESOLUTION",
    "TASK_PRIOR_RATIOS",
    "candidate_ratios",
    "crop_boxes_from_view_boxes",
    "greedy_select_indices",
    "hamming_distances",
    "image_prior_ratios",
    "mask_to_box",
    "random_ratios",
    "region_phash",
    "region_phasher",
    "rgb_to_grey",
    "select_image_prior_ratios",
    "standard_phash",
    "target_boxes_in_views",
    "task_prior_ratios",
    "view_boxes",
    "widen_degenerate_box",
]

PHASH_RESOLUTION = 224
"""Side of the square the crop is resized to before the DCT (upstream ``res=224``, independent of the model's image size)."""

HASH_SIZE = 8
_GREY_ROWS_PER_CHUNK = 1024


def candidate_ratios(num_candidates: int = 10) -> tuple[float, ...]:
    """The candidate grid ``((i + 1) / num_candidates for i in range(num_candidates))``; the last one is 1.0."""
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    return tuple((i + 1) / num_candidates for i in range(num_candidates))


CANDIDATE_RATIOS = candidate_ratios(10)
"""The released candidate grid: 0.1, 0.2, ..., 1.0."""

TASK_PRIOR_RATIOS: dict[str, tuple[float, ...]] = {
    # From the paper's description of task priors, NOT from upstream code (which always uses the image
    # prior): attribute detection wants a tight context, captioning a wider one (t around 0.4-0.5).
    "attributes": (0.1, 0.2),
    "captioning": (0.4, 0.5),
}
"""Paper-derived ``t`` of views 1.. for each task (view 0 is always ``t = 0``). Non-default extra."""


# --------------------------------------------------------------------------------------------- boxes


def view_boxes(box: Sequence[float], ratios: Sequence[float], width: int, height: int) -> np.ndarray:
    """Views of ``box`` for each ``t`` in ``ratios``, interpolated toward the full image in float32.

    Args:
        box: ``(x1, y1, x2, y2)`` in pixels, or a stack of boxes ``[..., 4]``.
        ratios: the coefficients ``t`` (each cast to float32, as NumPy does with a Python float):
            ``[V]``, or ``[..., V]`` with one row per box of a stack.
        width, height: image size.

    Returns:
        ``[V, 4]`` (``[..., V, 4]`` for a stack) float32 array, ``box + ((0, 0, width, height) - box) * t``.
    """
    box = np.asarray(box, dtype=np.float32)
    box = box.reshape(4) if box.ndim < 2 else box
    full = np.array([0, 0, width, height], dtype=np.float32)
    ratios = np.asarray(ratios, dtype=np.float32)
    return box[..., None, :] + (full - box[..., None, :]) * ratios[..., None]


def widen_degenerate_box(box: Sequence[float], width: int, height: int) -> tuple[float, float, float, float]:
    """Upstream's fix for boxes at most one pixel wide or high (polygon branch of ``seq2mask``).

    If ``x1 >= x2 - 1``: ``x1 = x2 - 1`` when ``x2 > 0``, else ``x2 = x1 + 1`` when ``width - x1 > 0``;
    the same for ``y`` with ``height``. Boxes wider than one pixel are returned unchanged.
    """
    x1, y1, x2, y2 = (float(v) for v in box)
    if x1 >= x2 - 1 and x2 > 0:
        x1 = x2 - 1
    elif x1 >= x2 - 1 and width - x1 > 0:
        x2 = x1 + 1
    if y1 >= y2 - 1 and y2 > 0:
        y1 = y2 - 1
    elif y1 >= y2 - 1 and height - y1 > 0:
        y2 = y1 + 1
    return x1, y1, x2, y2


def mask_to_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Box of a binary mask with upstream's RLE rule: first and **last** column/row holding a mask pixel.

    The right/bottom edges are inclusive indices, so the box is one pixel narrower than the usual
    exclusive convention (a mask painted from the integer box ``(x1, y1, x2, y2)`` comes back as
    ``(x1, y1, x2 - 1, y2 - 1)``), exactly as upstream's demo and RLE annotations give it.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be a 2-D array (H, W), got shape {mask.shape}")
    columns = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    if columns.size == 0:
        raise ValueError("the mask is empty (no non-zero pixel), so it has no box")
    return float(columns[0]), float(rows[0]), float(columns[-1]), float(rows[-1])


def crop_boxes_from_view_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Integer crops of float view boxes (docs/upstream/views.md §5.1): clip to the image, then truncate to int64.

    Args:
        boxes: ``[..., 4]`` float32 view boxes.

    Returns:
        ``[..., 4]`` int64 array.
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    limits = np.array([width, height, width, height], dtype=np.float32)
    return np.clip(boxes, 0, limits).astype(np.int64)


def target_boxes_in_views(
    target_box: np.ndarray, crop_boxes: np.ndarray, height: int, width: int
) -> np.ndarray:
    """The integer target box expressed in the pixels of each view resized to ``(height, width)``.

    Reproduces torchvision v2's box resize (docs/upstream/views.md §6): the offset box is multiplied by float32
    ratios ``new / old`` in float32 and truncated back to int64, without clamping. The float32 product
    can fall just below an integer, e.g. a 23-px crop maps its right edge to 223 instead of 224.
    A crop already of the output size is left as is.

    Args:
        target_box: ``[4]`` int64, the integer box of view 0 (or ``[..., 4]``, one per region).
        crop_boxes: ``[V, 4]`` int64 integer view boxes (or ``[..., V, 4]``).

    Returns:
        ``[V, 4]`` (``[..., V, 4]``) float32 array of integer values.
    """
    target_box = np.asarray(target_box, dtype=np.int64)
    crop_boxes = np.asarray(crop_boxes, dtype=np.int64)
    if target_box.ndim < 2:
        target_box, crop_boxes = target_box.reshape(4), crop_boxes.reshape(-1, 4)
    relative = target_box[..., None, :] - crop_boxes[..., [0, 1, 0, 1]]
    crop_w = crop_boxes[..., 2] - crop_boxes[..., 0]
    crop_h = crop_boxes[..., 3] - crop_boxes[..., 1]
    if np.any(crop_w <= 0) or np.any(crop_h <= 0):
        raise ValueError(f"empty crop in {crop_boxes.tolist()}: every view must cover at least one pixel")
    # Float64 division rounded to float32, as torch.tensor([w_ratio, h_ratio, ...]) stores Python's ratio.
    ratio_w = (width / crop_w.astype(np.float64)).astype(np.float32)
    ratio_h = (height / crop_h.astype(np.float64)).astype(np.float32)
    ratios = np.stack([ratio_w, ratio_h, ratio_w, ratio_h], axis=-1)
    scaled = (relative.astype(np.float32) * ratios).astype(np.int64)
    unchanged = (crop_w == width) & (crop_h == height)
    scaled[unchanged] = relative[unchanged]
    return scaled.astype(np.float32)


# ---------------------------------------------------------------------------------------------- pHash


def rgb_to_grey(image: Image.Image | np.ndarray) -> np.ndarray:
    """OpenCV's ``COLOR_RGB2GRAY`` on uint8: fixed-point BT.601 ``(4899 R + 9617 G + 1868 B + 2^13) >> 14``.

    Args:
        image: a PIL image (converted to RGB) or an ``[H, W, 3]`` uint8 array; an ``[H, W]`` uint8 array
            is taken as grey already.

    Returns:
        ``[H, W]`` uint8 array.
    """
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"rgb_to_grey expects uint8 pixels, got {image.dtype}")
    if image.ndim == 2:
        return image
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"rgb_to_grey expects an [H, W, 3] RGB array, got shape {image.shape}")
    grey = np.empty(image.shape[:2], dtype=np.uint8)
    for start in range(0, image.shape[0], _GREY_ROWS_PER_CHUNK):  # bounds the uint32 temporaries
        rows = image[start : start + _GREY_ROWS_PER_CHUNK]
        weighted = rows[..., 0].astype(np.uint32)
        weighted *= 4899
        weighted += rows[..., 1].astype(np.uint32) * 9617
        weighted += rows[..., 2].astype(np.uint32) * 1868
        weighted += 1 << 13
        weighted >>= 14
        grey[start : start + _GREY_ROWS_PER_CHUNK] = weighted
    return grey


def _opencv_linear_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and float32 weights of OpenCV's INTER_LINEAR along one axis (half-pixel centres).

    Mirrors ``cv::resize``'s coefficient set-up for floating-point images: the source coordinate is
    computed in double, rounded to float32, split into floor and fraction in float32, and clamped at
    both borders (fraction 0 there).
    """
    scale = 1.0 / (target / source)
    position = ((np.arange(target, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(position).astype(np.int64)
    fraction = position - first.astype(np.float32)
    outside = (first < 0) | (first >= source - 1)
    fraction[outside] = 0
    first = np.clip(first, 0, source - 1)
    second = np.minimum(first + 1, source - 1)
    return first, second, np.float32(1) - fraction, fraction


@lru_cache(maxsize=8)
def _dct_rows(resolution: int, count: int) -> np.ndarray:
    """The first ``count`` rows of the orthonormal DCT-II matrix of size ``resolution`` (float64)."""
    n = np.arange(resolution)
    k = np.arange(count)[:, None]
    matrix = np.cos(np.pi * (2 * n + 1) * k / (2 * resolution)) * np.sqrt(2.0 / resolution)
    matrix[0] = np.sqrt(1.0 / resolution)
    matrix.flags.writeable = False
    return matrix


@lru_cache(maxsize=4096)
def _resize_then_dct(
    source: int, resolution: int = PHASH_RESOLUTION
) -> tuple[slice | np.ndarray, np.ndarray, np.ndarray]:
    """The composed map "bilinear resize ``source -> resolution``, then the low DCT rows" along one axis.

    Returns:
        ``(read, compact, dense)``: the source samples the resize reads (a slice when it reads all of them,
        else at most ``2 * resolution`` indices), the ``[HASH_SIZE, n_read]`` float64 map applied to those
        samples, and the same map as a dense ``[HASH_SIZE, source]`` matrix.
    """
    first, second, w_first, w_second = _opencv_linear_taps(source, resolution)
    dct = _dct_rows(resolution, HASH_SIZE)
    dense = np.zeros((source, HASH_SIZE))
    np.add.at(dense, first, (dct * w_first.astype(np.float64)).T)
    np.add.at(dense, second, (dct * w_second.astype(np.float64)).T)
    dense = np.ascontiguousarray(dense.T)
    read = np.union1d(first, second)
    if read.size == source:
        read, compact = slice(None), dense
    else:
        compact = np.ascontiguousarray(dense[:, read])
    for array in (dense, compact) if isinstance(read, slice) else (dense, compact, read):
        array.flags.writeable = False
    return read, compact, dense


def _integer_box(box: Sequence[float]) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = np.asarray(box, dtype=np.float32).reshape(4).astype(np.int64).tolist()
    return x1, y1, x2, y2


def _phash_of_grey(grey: np.ndarray, box: Sequence[float], resolution: int = PHASH_RESOLUTION) -> np.ndarray:
    x1, y1, x2, y2 = _integer_box(box)
    crop = grey[y1:y2, x1:x2]  # NumPy slicing as upstream: no clipping
    if crop.size == 0:
        raise ValueError(f"the box {list(box)} selects no pixel of the {grey.shape[1]}x{grey.shape[0]} image")
    rows_read, rows_map, _ = _resize_then_dct(crop.shape[0], resolution)
    cols_map = _resize_then_dct(crop.shape[1], resolution)[2]
    # Only the rows the resize reads are gathered (cheap, contiguous); columns are contracted densely,
    # which costs less than gathering them. A float64 grey image (region_phasher) is not copied again.
    block = (rows_map @ crop[rows_read].astype(np.float64, copy=False)) @ cols_map.T
    return (block > block.mean()).astype(np.uint8).reshape(-1)


def region_phash(
    image: Image.Image | np.ndarray, box: Sequence[float], resolution: int = PHASH_RESOLUTION
) -> np.ndarray:
    """Upstream DynRefer's perceptual hash of one box (docs/upstream/views.md §4.2), bit-exact without OpenCV.

    Steps: OpenCV grey conversion; ``box`` truncated to int64 *without clipping* and used as a NumPy
    slice (as upstream); bilinear resize of the crop to ``resolution`` squared (OpenCV INTER_LINEAR);
    orthonormal 2-D DCT-II; the top-left 8x8 block including the DC term; bit = coefficient > block
    mean (strict). Only the 8x8 block is computed (``A_y @ crop @ A_x.T``).

    Args:
        image: a PIL image, an ``[H, W, 3]`` RGB uint8 array, or an ``[H, W]`` uint8 grey array (to hash
            many boxes of one image, use :func:`region_phasher`).
        box: ``(x1, y1, x2, y2)``, floats.

    Returns:
        ``[64]`` uint8 array of 0/1, the 8x8 block in row-major order (rows = vertical frequency).

    Raises:
        ValueError: if the box selects no pixel (upstream's OpenCV call would fail there).
    """
    return _phash_of_grey(rgb_to_grey(image), box, resolution)


def region_phasher(
    image: Image.Image | np.ndarray, resolution: int = PHASH_RESOLUTION
) -> Callable[[Sequence[float]], np.ndarray]:
    """:func:`region_phash` for many boxes of one image: ``box -> hash``, the grey image made once.

    The grey image is kept in float64, so that no box converts its crop again; the hashes are those
    of :func:`region_phash`.
    """
    return partial(_phash_of_grey, rgb_to_grey(image).astype(np.float64), resolution=resolution)


def standard_phash(image: Image.Image | np.ndarray, box: Sequence[float]) -> np.ndarray:
    """The common pHash of the ``imagehash`` package on the box's crop (not upstream's; opt-in only).

    ``imagehash.phash`` (PIL grey, 32x32 LANCZOS, unnormalised DCT, median threshold) gives different
    bits from :func:`region_phash`; views selected with it differ from the released model's.

    Returns:
        ``[64]`` uint8 array of 0/1, row-major.
    """
    import imagehash

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    x1, y1, x2, y2 = crop_boxes_from_view_boxes(np.asarray(box, np.float32), *image.size).tolist()
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f"the box {list(box)} selects no pixel of the {image.size[0]}x{image.size[1]} image")
    return imagehash.phash(image.crop((x1, y1, x2, y2))).hash.astype(np.uint8).reshape(-1)


def hamming_distances(reference: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Number of differing bits between ``reference`` ``[B]`` and each row of ``hashes`` ``[N, B]`` (int64)."""
    return (np.asarray(reference)[None] != np.asarray(hashes)).sum(axis=-1).astype(np.int64)


# ----------------------------------------------------------------------------------------- selection


def greedy_select_indices(scores: Sequence[float], count: int) -> list[int]:
    """Upstream's greedy pick: ``count`` times take ``argmax`` (first on ties), then zero every picked score.

    Kept as upstream has it: once the remaining maximum is 0, ``argmax`` returns the lowest index
    holding 0, which may be one already picked, so an index can repeat (e.g. all scores 0 -> [0, 0]).
    """
    scores = np.array(scores, dtype=np.float64)
    picked: list[int] = []
    for _ in range(count):
        picked.append(int(np.argmax(scores)))
        scores[picked] = 0
    return picked


def image_prior_ratios(
    box_hash: Callable[[np.ndarray], np.ndarray],
    box: Sequence[float],
    width: int,
    height: int,
    num_views: int = 3,
    candidates: Sequence[float] = CANDIDATE_RATIOS,
) -> tuple[list[float], np.ndarray]:
    """Image-prior selection (docs/upstream/views.md §4): rank candidates by ``hamming(hash(view 0), hash(view t)) / t``.

    Args:
        box_hash: hash of a float32 box, e.g. ``functools.partial(region_phash, grey)``.
        box: the region box (view 0).
        num_views: total views including view 0.
        candidates: the candidate ``t`` (all > 0).

    Returns:
        ``(ratios, distances)``: the ``num_views`` ratios ``[0.0, best, second, ...]`` and the
        ``[len(candidates)]`` Hamming distances of the candidates to view 0.
    """
    boxes = view_boxes(box, [0.0, *candidates], width, height)
    hashes = np.stack([box_hash(b) for b in boxes])
    distances = hamming_distances(hashes[0], hashes[1:])
    picked = greedy_select_indices(distances / np.asarray(candidates, dtype=np.float64), num_views - 1)
    return [0.0, *(candidates[i] for i in picked)], distances


def select_image_prior_ratios(
    box_hash: Callable[[np.ndarray], np.ndarray],
    box: Sequence[float],
    width: int,
    height: int,
    num_views: int = 3,
    candidates: Sequence[float] = CANDIDATE_RATIOS,
) -> list[float]:
    """The ratios of :func:`image_prior_ratios`, hashing only the candidates that can still be picked.

    A candidate's score ``hamming / t`` is at most ``bits / t`` (64 bits). Candidates are hashed in
    order; once the ``num_views - 1``-th best score so far is positive and at least the bound of every
    candidate not yet hashed, none of those can be picked (a later index wins a tie only when strictly
    greater), so the greedy pick over the hashed candidates is the pick over all of them. With the
    released grid small ``t`` win most of the time, and the large views (the costliest hashes) are
    skipped. Candidates must be positive.

    Returns:
        the ``num_views`` ratios ``[0.0, best, second, ...]``, identical to ``image_prior_ratios(...)[0]``.
    """
    picks = num_views - 1
    if picks < 1:
        return [0.0]
    boxes = view_boxes(box, [0.0, *candidates], width, height)
    reference = box_hash(boxes[0])
    t = np.asarray(candidates, dtype=np.float64)
    bounds = np.float64(reference.size) / t
    bound_of_rest = np.maximum.accumulate(bounds[::-1])[::-1]  # [i]: the highest bound from candidate i on
    scores: list[float] = []
    for index in range(len(candidates)):
        if len(scores) >= picks:
            kth_best = sorted(scores, reverse=True)[picks - 1]
            if kth_best > 0 and kth_best >= bound_of_rest[index]:
                break
        distance = hamming_distances(reference, box_hash(boxes[index + 1])[None])[0]
        scores.append(distance / t[index])
    return [0.0, *(candidates[i] for i in greedy_select_indices(scores, picks))]


def random_ratios(
    num_views: int = 3, candidates: Sequence[float] = CANDIDATE_RATIOS, rng: random.Random | None = None
) -> list[float]:
    """Training selection: ``[0.0]`` then ``num_views - 1`` distinct candidates drawn as ``random.sample`` does.

    ``rng`` defaults to the global ``random`` module, as upstream (so ``random.seed`` controls it).
    """
    sampler = random if rng is None else rng
    indices = sampler.sample(range(len(candidates)), num_views - 1)
    return [0.0, *(candidates[i] for i in indices)]


def task_prior_ratios(task: str, num_views: int = 3) -> list[float]:
    """``[0.0, *TASK_PRIOR_RATIOS[task]]``; a paper-derived preset, not upstream behaviour."""
    if task not in TASK_PRIOR_RATIOS:
        raise ValueError(f"unknown task prior {task!r}; known: {sorted(TASK_PRIOR_RATIOS)}")
    ratios = [0.0, *TASK_PRIOR_RATIOS[task]]
    if len(ratios) != num_views:
        raise ValueError(f"task prior {task!r} defines {len(ratios)} views, the processor uses {num_views}")
    return ratios
