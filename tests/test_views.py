"""Nested views: golden vectors from upstream's own code, slow references, and box properties."""

import functools
import json
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dynrefer_hf import views


@pytest.fixture(scope="module")
def golden(fixtures_dir):
    return json.loads((fixtures_dir / "golden_views.json").read_text())


@functools.cache
def _image(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _bits(text: str) -> list[int]:
    return [int(c) for c in text]


# ------------------------------------------------------------------------------------- slow references


def _reference_grey(rgb: np.ndarray) -> np.ndarray:
    """OpenCV 4.5.5 RGB2GRAY for uint8, written per pixel with Python integers."""
    out = np.empty(rgb.shape[:2], dtype=np.uint8)
    for y in range(rgb.shape[0]):
        for x in range(rgb.shape[1]):
            r, g, b = (int(v) for v in rgb[y, x])
            out[y, x] = (r * 4899 + g * 9617 + b * 1868 + 8192) >> 14
    return out


def _reference_resize_axis(length: int, size: int) -> np.ndarray:
    """Dense [size, length] matrix of OpenCV's INTER_LINEAR along one axis, one output sample at a time."""
    matrix = np.zeros((size, length))
    scale = 1.0 / (size / length)
    for d in range(size):
        f = np.float32((d + 0.5) * scale - 0.5)
        s = int(np.floor(f))
        f = np.float32(f - np.float32(s))
        if s < 0:
            s, f = 0, np.float32(0)
        if s >= length - 1:
            s, f = length - 1, np.float32(0)
        matrix[d, s] += np.float32(1) - f
        matrix[d, min(s + 1, length - 1)] += f
    return matrix


def _reference_phash(grey: np.ndarray, box) -> list[int]:
    """Upstream's steps literally: full 224x224 resize, full 224x224 orthonormal DCT, 8x8 block, mean threshold."""
    x1, y1, x2, y2 = np.asarray(box, np.float32).astype(np.int64)
    crop = grey[y1:y2, x1:x2].astype(np.float64)
    resized = _reference_resize_axis(crop.shape[0], 224) @ crop @ _reference_resize_axis(crop.shape[1], 224).T
    n = np.arange(224)
    dct = np.array([np.cos(np.pi * (2 * n + 1) * k / 448) for k in range(224)]) * np.sqrt(2 / 224)
    dct[0] = np.sqrt(1 / 224)
    block = (dct @ resized @ dct.T)[:8, :8]
    return (block > block.mean()).astype(int).reshape(-1).tolist()


def _torchvision_box_resize(relative: list[int], crop_w: int, crop_h: int, size: int = 224) -> list[int]:
    """torchvision v2 resize_bounding_boxes: int64 box times float32 ratios, cast back to int64."""
    if (crop_w, crop_h) == (size, size):
        return relative
    ratios = torch.tensor([size / crop_w, size / crop_h, size / crop_w, size / crop_h])
    return torch.tensor(relative, dtype=torch.int64).mul(ratios).to(torch.int64).tolist()


# --------------------------------------------------------------------------------------------- golden


@pytest.mark.slow
def test_golden_views_reproduced_in_full(golden, fixtures_dir):
    """Every region of golden_views.json: pHash bits, distances, selected t, float32 views, crops, 224-px boxes."""
    assert len(golden["cases"]) == 14 and sum(len(c["regions"]) for c in golden["cases"]) == 56
    for case in golden["cases"]:
        rgb = _image(str(fixtures_dir / "images" / case["image"]))
        assert rgb.shape[:2] == (case["height"], case["width"])
        grey = views.rgb_to_grey(rgb)
        box_hash = functools.partial(views.region_phash, grey)
        for region in case["regions"]:
            where = (case["image"], region["input_box_xyxy"])
            box = region["input_box_xyxy"]
            assert views.region_phash(rgb, box).tolist() == _bits(region["view0_phash_bits"]), where
            ratios, distances = views.image_prior_ratios(box_hash, box, case["width"], case["height"])
            assert distances.tolist() == region["hamming_to_view0_t0.1..1.0"], where
            assert ratios == region["selected_t"], where
            boxes = views.view_boxes(box, ratios, case["width"], case["height"])
            assert boxes.dtype == np.float32
            assert boxes.tolist() == region["view_boxes_float32"], where
            crops = views.crop_boxes_from_view_boxes(boxes, case["width"], case["height"])
            assert crops.tolist() == [v["int_view_box"] for v in region["views"]], where
            assert (crops[:, 2:] - crops[:, :2]).tolist() == [v["crop_wh"] for v in region["views"]], where
            targets = views.target_boxes_in_views(crops[0], crops, 224, 224)
            assert targets.tolist() == [v["target_in_view_224"] for v in region["views"]], where


def test_golden_223_case_present(golden):
    """The vectors exercise the float32 truncation to 223 (docs/upstream/views.md §6), so the test above covers it."""
    entries = [v["target_in_view_224"] for c in golden["cases"] for r in c["regions"] for v in r["views"]]
    assert any(223 in box for box in entries)


# ----------------------------------------------------------------------------------- pHash references


def test_grey_matches_per_pixel_reference(fixtures_dir):
    rgb = _image(str(fixtures_dir / "images" / "COCO_val2014_000000000042.jpg"))[100:140, 200:260]
    assert np.array_equal(views.rgb_to_grey(rgb), _reference_grey(rgb))
    every_colour = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert np.array_equal(views.rgb_to_grey(every_colour), _reference_grey(every_colour))


def test_region_phash_matches_full_resize_and_dct(fixtures_dir):
    rgb = _image(str(fixtures_dir / "images" / "COCO_val2014_000000000139.jpg"))
    grey = views.rgb_to_grey(rgb)
    height, width = grey.shape
    rng = np.random.default_rng(1)
    boxes = [[0, 0, width, height], [0.5, 0.5, 1.9, 300.2], [10, 10, 458, 458], [100, 50, 324, 274]]
    for _ in range(12):
        x1, x2 = sorted(rng.uniform(0, width, 2))
        y1, y2 = sorted(rng.uniform(0, height, 2))
        boxes.append([x1, y1, x2 + 1, y2 + 1])
    for box in boxes:
        assert views.region_phash(grey, box).tolist() == _reference_phash(grey, box), box


@pytest.mark.parametrize("length", [1, 2, 23, 224, 300, 448, 449, 1000])
def test_low_frequency_block_map_equals_dct_after_resize(length):
    """The composed (8, n) map equals the first 8 DCT rows times the full resize matrix."""
    read, compact, dense = views._resize_then_dct(length)
    assert np.array_equal(dense[:, read], compact) and not np.any(
        np.delete(dense, np.arange(length)[read], 1)
    )
    n = np.arange(224)
    dct = np.array([np.cos(np.pi * (2 * n + 1) * k / 448) for k in range(8)]) * np.sqrt(2 / 224)
    dct[0] = np.sqrt(1 / 224)
    assert np.allclose(dense, dct @ _reference_resize_axis(length, 224), rtol=0, atol=1e-12)


def test_resize_taps_follow_opencv():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(2)
    for height, width in [(1, 1), (7, 300), (224, 224), (480, 640), (448, 448), (1000, 37)]:
        image = rng.uniform(0, 255, (height, width)).astype(np.float32)
        ours = _reference_resize_axis(height, 224) @ image @ _reference_resize_axis(width, 224).T
        # OpenCV >= 5 computes the fraction in double; 4.5.5 (upstream) in float32: both agree to ~1e-5 px.
        assert np.allclose(ours, cv2.resize(image, (224, 224)), atol=2e-2, rtol=0)


def test_phash_bits_agree_with_opencv_on_fixture_images(fixtures_dir):
    cv2 = pytest.importorskip("cv2")
    for name in ["COCO_val2014_000000000073.jpg", "COCO_val2014_000000000415.jpg"]:
        grey = views.rgb_to_grey(_image(str(fixtures_dir / "images" / name)))
        height, width = grey.shape
        for t in views.CANDIDATE_RATIOS:
            box = views.view_boxes(
                [width * 0.3, height * 0.3, width * 0.5, height * 0.6], [t], width, height
            )[0]
            x1, y1, x2, y2 = box.astype(np.int64)
            block = cv2.dct(cv2.resize(grey[y1:y2, x1:x2].astype(np.float32), (224, 224)))[:8, :8]
            assert (
                views.region_phash(grey, box).tolist() == (block > block.mean()).astype(int).ravel().tolist()
            )


def test_phash_of_constant_crop_sets_only_dc():
    grey = np.full((30, 40), 77, dtype=np.uint8)
    assert views.region_phash(grey, [3, 4, 20, 25]).tolist() == [1] + [0] * 63


def test_phash_empty_crop_raises():
    with pytest.raises(ValueError, match="selects no pixel"):
        views.region_phash(np.zeros((10, 10), np.uint8), [5, 5, 5.5, 9])


def test_standard_phash_is_imagehash_of_the_crop(fixtures_dir):
    imagehash = pytest.importorskip("imagehash")
    image = Image.open(fixtures_dir / "images" / "COCO_val2014_000000000074.jpg").convert("RGB")
    expected = imagehash.phash(image.crop((40, 30, 300, 200))).hash.astype(int).ravel().tolist()
    assert views.standard_phash(image, [40.7, 30.2, 300.9, 200.5]).tolist() == expected


# ------------------------------------------------------------------------------------------ selection


def test_greedy_ties_and_repeats_like_upstream():
    assert views.greedy_select_indices([1.0, 3.0, 3.0, 2.0], 2) == [1, 2]  # first index on ties
    assert views.greedy_select_indices([0.0, 4.0, 0.0], 3) == [1, 0, 0]  # zeroed max: index 0 again
    same_hash = lambda box: np.zeros(64, np.uint8)
    ratios, distances = views.image_prior_ratios(same_hash, [10, 10, 20, 20], 100, 100)
    assert ratios == [0.0, 0.1, 0.1] and distances.tolist() == [0] * 10


def test_score_is_distance_over_t():
    # distances 1..10 over t = 0.1..1.0 are all 10: ties resolved to the first index; then index 1.
    fake = {i: np.array([1] * i + [0] * (64 - i), np.uint8) for i in range(11)}
    grid = [0.0, *views.CANDIDATE_RATIOS]
    boxes = {
        tuple(views.view_boxes([10, 10, 20, 20], [t], 100, 100)[0].tolist()): i for i, t in enumerate(grid)
    }
    ratios, distances = views.image_prior_ratios(
        lambda b: fake[boxes[tuple(b.tolist())]], [10, 10, 20, 20], 100, 100
    )
    assert distances.tolist() == list(range(1, 11))
    assert ratios == [0.0, 0.1, 0.2]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 64), min_size=10, max_size=10),
    st.integers(1, 6),
    st.sampled_from([views.CANDIDATE_RATIOS, views.candidate_ratios(5), (0.5, 0.25, 1.0, 0.1)]),
)
def test_pruned_selection_equals_the_full_ranking(distances, num_views, candidates):
    """select_image_prior_ratios hashes fewer candidates but picks exactly what image_prior_ratios picks."""
    num_views = min(num_views, len(candidates) + 1)
    box, size = [10, 20, 30, 50], (100, 80)
    keys = [tuple(b) for b in views.view_boxes(box, [0.0, *candidates], *size).tolist()]
    # view 0 hashes to zeros, candidate i to `distances[i]` ones (distinct boxes, so a dict lookup)
    hashes = {key: np.array([1] * d + [0] * (64 - d), np.uint8) for key, d in zip(keys, [0, *distances])}
    hashed = []

    def box_hash(b):
        hashed.append(tuple(b.tolist()))
        return hashes[hashed[-1]]

    full = views.image_prior_ratios(lambda b: hashes[tuple(b.tolist())], box, *size, num_views, candidates)[0]
    assert views.select_image_prior_ratios(box_hash, box, *size, num_views, candidates) == full
    assert hashed == keys[: len(hashed)]  # in order, each once


def test_pruned_selection_skips_candidates_that_cannot_win():
    # distances 30, 28, 27, 26, ...: scores 300, 140, 90, 65, ... The second best, 140, is at least
    # the bound 64 / t of every t from 0.5 on (128, 107, ...), so those five are never hashed.
    distances = (0, 30, 28, 27, 26, 25, 24, 23, 22, 21, 20)
    hashes = [np.array([1] * d + [0] * (64 - d), np.uint8) for d in distances]
    grid = [0.0, *views.CANDIDATE_RATIOS]
    boxes = [tuple(b) for b in views.view_boxes([10, 10, 20, 20], grid, 100, 100).tolist()]
    calls = []

    def box_hash(b):
        calls.append(boxes.index(tuple(b.tolist())))
        return hashes[calls[-1]]

    assert views.select_image_prior_ratios(box_hash, [10, 10, 20, 20], 100, 100) == [0.0, 0.1, 0.2]
    assert calls == [0, 1, 2, 3, 4]
    calls.clear()
    assert views.select_image_prior_ratios(box_hash, [10, 10, 20, 20], 100, 100, num_views=1) == [0.0]
    assert calls == []


def test_region_phasher_equals_region_phash():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (70, 500, 3), dtype=np.uint8)
    phash = views.region_phasher(image)
    for _ in range(50):
        x1, y1 = rng.uniform(0, 499), rng.uniform(0, 69)
        box = [x1, y1, rng.uniform(x1 + 1, 500), rng.uniform(y1 + 1, 70)]
        assert phash(box).tolist() == views.region_phash(image, box).tolist()


def test_view_and_target_boxes_of_a_stack_equal_one_box_at_a_time():
    rng = np.random.default_rng(4)
    boxes = rng.uniform(0, 300, (6, 4)).astype(np.float32)
    boxes[:, 2:] += boxes[:, :2] + 1
    ratios = rng.choice(views.CANDIDATE_RATIOS, (6, 3))
    ratios[:, 0] = 0
    stacked = views.view_boxes(boxes, ratios, 640, 480)
    crops = views.crop_boxes_from_view_boxes(stacked, 640, 480)
    targets = views.target_boxes_in_views(crops[:, 0], crops, 224, 224)
    for i in range(6):
        assert np.array_equal(stacked[i], views.view_boxes(boxes[i], ratios[i], 640, 480))
        assert np.array_equal(targets[i], views.target_boxes_in_views(crops[i, 0], crops[i], 224, 224))


def test_random_ratios_follow_random_sample():
    for seed in range(5):
        expected = random.Random(seed).sample(range(10), 2)
        ratios = views.random_ratios(3, views.CANDIDATE_RATIOS, random.Random(seed))
        assert ratios == [0.0, *(views.CANDIDATE_RATIOS[i] for i in expected)]
    random.seed(3)
    first = views.random_ratios()
    random.seed(3)
    assert views.random_ratios() == first  # global random module, as upstream


def test_task_priors():
    assert views.task_prior_ratios("attributes") == [0.0, 0.1, 0.2]
    assert views.task_prior_ratios("captioning")[1] in (0.4, 0.5)
    with pytest.raises(ValueError, match="unknown task"):
        views.task_prior_ratios("segmentation")


def test_candidate_grid():
    assert views.CANDIDATE_RATIOS == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


# -------------------------------------------------------------------------------------------- boxes


def test_mask_to_box_uses_inclusive_last_index():
    mask = np.zeros((20, 30), bool)
    mask[4:9, 7:15] = True  # painted from the integer box (7, 4, 15, 9)
    assert views.mask_to_box(mask) == (7.0, 4.0, 14.0, 8.0)
    with pytest.raises(ValueError, match="empty"):
        views.mask_to_box(np.zeros((5, 5)))


def test_widen_degenerate_box():
    assert views.widen_degenerate_box([5, 5, 5, 5], 10, 10) == (4, 4, 5, 5)
    assert views.widen_degenerate_box([0, 0, 0, 0.5], 10, 10) == (0, -0.5, 1, 0.5)
    assert views.widen_degenerate_box([2, 3, 8, 9], 10, 10) == (2, 3, 8, 9)


def test_target_box_223_truncation():
    # A 23-px crop: 23 * float32(224/23) rounds below 224.
    crops = np.array([[0, 0, 23, 46], [0, 0, 224, 224]])
    assert views.target_boxes_in_views(crops[0], crops, 224, 224).tolist() == [
        [0, 0, 223, 223],
        [0, 0, 23, 46],
    ]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 60),
    st.integers(1, 60),
    st.lists(st.integers(0, 60), min_size=4, max_size=4),
    st.integers(100, 2000),
    st.integers(100, 2000),
)
def test_target_box_mapping_matches_torchvision(x1, y1, extent, crop_w, crop_h):
    crop = np.array([[0, 0, crop_w, crop_h]])
    target = np.array([x1, y1, min(x1 + extent[0] + 1, crop_w), min(y1 + extent[1] + 1, crop_h)])
    ours = views.target_boxes_in_views(target, crop, 224, 224)[0].tolist()
    assert ours == _torchvision_box_resize(target.tolist(), crop_w, crop_h)


@st.composite
def _image_and_box(draw):
    width, height = draw(st.integers(1, 3000)), draw(st.integers(1, 3000))
    x1 = draw(st.floats(0, width - 1, allow_nan=False))
    y1 = draw(st.floats(0, height - 1, allow_nan=False))
    x2 = draw(st.floats(x1 + 1, width, allow_nan=False))
    y2 = draw(st.floats(y1 + 1, height, allow_nan=False))
    return width, height, [x1, y1, x2, y2]


@settings(max_examples=150, deadline=None)
@given(_image_and_box())
def test_views_contain_the_box_nest_and_map_inside(image_and_box):
    width, height, box = image_and_box
    grid = [0.0, *views.CANDIDATE_RATIOS]
    boxes = views.view_boxes(box, grid, width, height).astype(np.float64)
    box32 = np.asarray(box, np.float32)
    # every view contains the target box, and views nest as t grows
    assert np.all(boxes[:, :2] <= box32[:2]) and np.all(boxes[:, 2:] >= box32[2:])
    assert np.all(np.diff(boxes[:, :2], axis=0) <= 0) and np.all(np.diff(boxes[:, 2:], axis=0) >= 0)
    assert boxes[-1].tolist() == [0, 0, width, height]
    crops = views.crop_boxes_from_view_boxes(boxes, width, height)
    assert np.all(crops[:, :2] <= crops[0, :2]) and np.all(crops[:, 2:] >= crops[0, 2:])
    assert np.all(crops[:, 2:] > crops[:, :2])
    mapped = views.target_boxes_in_views(crops[0], crops, 224, 224)
    assert np.all(mapped >= 0) and np.all(mapped <= 224)
    assert np.all(mapped[:, 2:] >= mapped[:, :2])
