"""Image processor of DynRefer: nested views around every region (spec views.md).

For each region of an image, the processor chooses ``num_views`` interpolation coefficients ``t``
(view 0 is always the tight box), crops every view out of the image, resizes each crop to the model's
square input with PIL bicubic, normalises it with the CLIP mean/std, and maps the region box into the
pixels of each resized view. Any number of images, each with any number of regions, are processed in
one call; the regions of all images are concatenated along the first axis.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from functools import cache, partial
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from threadpoolctl import ThreadpoolController
from transformers import BaseImageProcessor, BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling

from .images import to_rgb_array
from .validation import binary_masks, check_count, check_number, checked_region_box
from .views import (
    PHASH_RESOLUTION,
    TASK_PRIOR_RATIOS,
    candidate_ratios,
    crop_boxes_from_view_boxes,
    mask_to_box,
    random_ratios,
    region_phasher,
    select_image_prior_ratios,
    standard_phash,
    target_boxes_in_views,
    task_prior_ratios,
    view_boxes,
)

__all__ = ["DynReferImageProcessor", "as_region_boxes"]

VIEW_SELECTIONS = ("image_prior", "random", "task")
PHASH_METHODS = ("upstream", "imagehash")
# Default cap on the threads that build the views (beyond it, resizing is memory-bound).
_MAX_THREADS = 8


@cache
def _blas_controller() -> ThreadpoolController:
    return ThreadpoolController()


_blas_lock = threading.Lock()
_blas_users = 0
_blas_limiter = None


@contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """NumPy's BLAS on one thread while views are built, restored when the last concurrent call ends.

    The pHash products are small (at most 8 x 448 x W): BLAS threads gain little on them, and on a busy
    machine their spin-waiting makes each product up to 50 times slower (docs/processor.md, Performance).
    The views' own threads parallelise the resizing instead.
    """
    global _blas_users, _blas_limiter
    with _blas_lock:
        if _blas_users == 0:
            _blas_limiter = _blas_controller().limit(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None


def _thread_count(num_threads: int | None) -> int:
    if num_threads is None:
        return min(os.cpu_count() or 1, _MAX_THREADS)
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive integer or None, got {num_threads!r}")
    return num_threads


def _is_single_image(images: Any) -> bool:
    if isinstance(images, Image.Image):
        return True
    return isinstance(images, np.ndarray) and images.ndim in (2, 3)


def as_region_boxes(
    boxes: Any = None, masks: Any = None, image_size: tuple[int, int] | None = None, where: str = "the image"
) -> np.ndarray:
    """The regions of one image as float64 ``[R, 4]`` boxes ``(x1, y1, x2, y2)``: ``boxes`` (``[4]`` or ``[R, 4]``,
    a list, array or tensor) or binary ``masks`` (``[H, W]`` or ``[R, H, W]``, ``image_size = (H, W)``) reduced
    to boxes by upstream's rule (``views.mask_to_box``); ``[0, 4]`` when there are none.

    The one place regions are read: the processor, the pipeline and the command line all come through here
    (coordinates are checked against the image by ``validation.checked_region_box``).
    """
    if (boxes is None) == (masks is None):
        raise ValueError(f"{where}: pass exactly one of `boxes` or `masks`")
    if masks is not None:
        masks = binary_masks(masks, f"{where}: masks")
        masks = masks[None] if masks.ndim == 2 else masks
        if masks.ndim != 3 or (image_size is not None and masks.shape[1:] != tuple(image_size)):
            expected = "[R, H, W]" if image_size is None else f"[R, H, W] with the image's (H, W) = {tuple(image_size)}"
            raise ValueError(f"{where}: masks must be {expected}, got {list(masks.shape)}")
        boxes = []
        for region, mask in enumerate(masks):
            try:
                boxes.append(mask_to_box(mask))
            except ValueError as error:
                raise ValueError(f"{where}, mask {region}: {error}") from None
    if hasattr(boxes, "detach"):  # a torch tensor, on any device
        boxes = boxes.detach().cpu().numpy()
    try:
        array = np.asarray(boxes, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: boxes must be numbers shaped [[x1, y1, x2, y2], ...]") from None
    if array.size == 0:
        return np.zeros((0, 4))
    if array.ndim == 1 and array.shape[0] == 4:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"{where}: boxes must be [[x1, y1, x2, y2], ...], got an array of shape {list(array.shape)}")
    return array


def _split_per_image(values: Any, num_images: int, single: bool, name: str, item_ndim: int) -> list[Any]:
    """One entry per image. A single image takes its own entry directly, or wrapped in a one-element list."""
    if single:
        try:
            wrapped = np.ndim(values) == item_ndim + 2 and len(values) == 1
        except ValueError:  # ragged nesting: not a one-image batch
            wrapped = False
        return [values[0]] if wrapped else [values]
    if len(values) != num_images:
        raise ValueError(f"{name} must hold one entry per image: got {len(values)} for {num_images} images")
    return list(values)


class DynReferImageProcessor(BaseImageProcessor):
    r"""Builds DynRefer's nested views for every region of every image.

    Args:
        size (`dict`, *optional*, defaults to `{"height": 224, "width": 224}`): side of each view fed to the
            vision tower. Crops are resized to exactly this size (aspect ratio not kept), as upstream.
        num_views (`int`, *optional*, defaults to 3): views per region, view 0 being the tight box.
        num_candidate_views (`int`, *optional*, defaults to 10): the candidate grid `t = (i + 1) / n`.
        view_selection (`str`, *optional*, defaults to `"image_prior"`): default selection: `"image_prior"`
            (upstream inference, pHash greedy ranking), `"random"` (upstream training) or `"task"` (paper
            task priors, needs `task`).
        task (`str`, *optional*): default task prior (`"attributes"` or `"captioning"`) for `"task"`.
        phash_method (`str`, *optional*, defaults to `"upstream"`): `"upstream"` (bit-exact DynRefer pHash)
            or `"imagehash"` (the `imagehash` package's pHash; changes which views are chosen).
        phash_resolution (`int`, *optional*, defaults to 224): resize side inside the pHash.
        resample (`int`, *optional*, defaults to `PILImageResampling.BICUBIC`): PIL filter for the crops.
        rescale_factor (`float`, *optional*, defaults to `1/255`), image_mean, image_std (*optional*, CLIP's):
            pixel normalisation `(x * rescale_factor - mean) / std`, in float32 as torchvision does.
    """

    model_input_names: ClassVar[list[str]] = ["pixel_values", "view_boxes"]

    def __init__(
        self,
        size: dict[str, int] | None = None,
        num_views: int = 3,
        num_candidate_views: int = 10,
        view_selection: str = "image_prior",
        task: str | None = None,
        phash_method: str = "upstream",
        phash_resolution: int = PHASH_RESOLUTION,
        resample: int = PILImageResampling.BICUBIC,
        rescale_factor: float = 1 / 255,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if size is not None and (
            not isinstance(size, dict)
            or set(size) != {"height", "width"}
            or not all(isinstance(side, int) and not isinstance(side, bool) and side >= 1 for side in size.values())
        ):
            raise ValueError(f"size must be {{'height': H, 'width': W}} with positive integer sides, got {size!r}")
        self.size = dict(size) if size is not None else {"height": 224, "width": 224}
        self.num_views = check_count("num_views", num_views)
        self.num_candidate_views = check_count("num_candidate_views", num_candidate_views)
        self.view_selection = view_selection
        self.task = task
        self.phash_method = phash_method
        self.phash_resolution = check_count("phash_resolution", phash_resolution)
        self.resample = int(resample)
        self.rescale_factor = check_number("rescale_factor", rescale_factor, 0.0, low_open=True)
        self.image_mean = self._channel_values("image_mean", image_mean, OPENAI_CLIP_MEAN)
        self.image_std = self._channel_values("image_std", image_std, OPENAI_CLIP_STD)
        if min(self.image_std) <= 0:
            raise ValueError(f"image_std must be positive, got {self.image_std}")
        self._check_settings()

    @staticmethod
    def _channel_values(name: str, values: Sequence[float] | None, default: Sequence[float]) -> list[float]:
        """Three finite numbers, one per RGB channel."""
        values = list(default) if values is None else values
        if isinstance(values, str) or not isinstance(values, Sequence) or len(values) != 3:
            raise ValueError(f"{name} must be three numbers (R, G, B), got {values!r}")
        return [check_number(f"{name}[{index}]", value) for index, value in enumerate(values)]

    def _check_settings(self) -> None:
        if self.num_views - 1 > self.num_candidate_views:
            raise ValueError(f"{self.num_views} views need at least {self.num_views - 1} candidates")
        if self.phash_method not in PHASH_METHODS:
            raise ValueError(f"phash_method must be one of {PHASH_METHODS}, got {self.phash_method!r}")
        if isinstance(self.view_selection, str) and self.view_selection not in VIEW_SELECTIONS:
            raise ValueError(f"view_selection must be one of {VIEW_SELECTIONS}, got {self.view_selection!r}")

    @property
    def candidate_ratios(self) -> tuple[float, ...]:
        return candidate_ratios(self.num_candidate_views)

    # ------------------------------------------------------------------------------------------ input

    def _regions_per_image(
        self, images: list[np.ndarray], boxes: Any, masks: Any, normalized_boxes: bool, single: bool
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per image, its float64 ``[R_i, 4]`` region boxes in pixels as given, and as the views use them
        (validated and widened, docs/upstream/views.md §1)."""
        if (boxes is None) == (masks is None):
            raise ValueError("pass exactly one of `boxes` or `masks` (one list per image)")
        name, regions = ("boxes", boxes) if boxes is not None else ("masks", masks)
        entries = _split_per_image(regions, len(images), single, name, 1 if boxes is not None else 2)
        result = []
        for index, (image, entry) in enumerate(zip(images, entries)):
            height, width = image.shape[:2]
            given = as_region_boxes(**{name: entry}, image_size=(height, width), where=f"image {index}")
            if normalized_boxes:
                given = given * np.array([width, height, width, height], dtype=np.float64)
            checked = [checked_region_box(box, width, height, f"image {index}, region {k}") for k, box in enumerate(given)]
            result.append((given, np.array(checked).reshape(-1, 4)))
        return result

    # -------------------------------------------------------------------------------------- selection

    def _view_ratios(
        self,
        box: np.ndarray,
        width: int,
        height: int,
        view_selection: str | Sequence[float],
        task: str | None,
        box_hash,
        rng: random.Random | None,
    ) -> list[float]:
        if not isinstance(view_selection, str):
            return [0.0, *(float(t) for t in view_selection)]
        if view_selection == "image_prior":
            return select_image_prior_ratios(
                box_hash, box, width, height, self.num_views, self.candidate_ratios
            )
        if view_selection == "random":
            return random_ratios(self.num_views, self.candidate_ratios, rng)
        return task_prior_ratios(task, self.num_views)

    def check_view_selection(self, view_selection: str | Sequence[float], task: str | None) -> None:
        """Raise a clear error unless ``view_selection`` (with ``task``) is one this processor can build."""
        if isinstance(view_selection, str):
            if view_selection not in VIEW_SELECTIONS:
                raise ValueError(
                    f"view_selection must be one of {VIEW_SELECTIONS} or a list of t, got {view_selection!r}"
                )
            if view_selection == "task" and task not in TASK_PRIOR_RATIOS:
                raise ValueError(
                    f"view_selection='task' needs task in {sorted(TASK_PRIOR_RATIOS)}, got {task!r}"
                )
            return
        if not isinstance(view_selection, Sequence) or not all(
            isinstance(t, (int, float, np.floating, np.integer)) and not isinstance(t, bool) for t in view_selection
        ):
            raise TypeError(
                f"view_selection must be one of {VIEW_SELECTIONS} or a list of t in [0, 1], got {view_selection!r}"
            )
        ratios = [float(t) for t in view_selection]
        if len(ratios) != self.num_views - 1:
            raise ValueError(
                f"give the t of views 1..{self.num_views - 1} ({self.num_views - 1} values), got {ratios}"
            )
        if not all(0.0 <= t <= 1.0 for t in ratios):
            raise ValueError(f"every t must lie in [0, 1], got {ratios}")

    # ---------------------------------------------------------------------------------------- pixels

    def _write_view(
        self, image: Image.Image, crop_box: tuple[int, int, int, int], slots: list[int], out: np.ndarray
    ) -> None:
        """Crop, resize and normalise one view into ``out[slots[0]]``, then copy it to the other slots.

        Normalisation is torchvision's, in float32 and in its order: ``x * rescale_factor``, minus mean,
        over std. PIL releases the GIL while resizing and NumPy while computing, so views are built in
        parallel threads.
        """
        crop = image.crop(crop_box)
        target = (self.size["width"], self.size["height"])
        if crop.size != target:  # upstream leaves crops of the right size untouched
            crop = crop.resize(target, resample=self.resample)
        view = out[slots[0]]
        # uint8 HWC -> float32 CHW, times the factor (both in float32, as converting first would do)
        np.multiply(
            np.asarray(crop).transpose(2, 0, 1), np.float32(self.rescale_factor), out=view, dtype=np.float32
        )
        view -= np.asarray(self.image_mean, dtype=np.float32).reshape(3, 1, 1)
        view /= np.asarray(self.image_std, dtype=np.float32).reshape(3, 1, 1)
        for slot in slots[1:]:
            out[slot] = view

    # ------------------------------------------------------------------------------------------- call

    def __call__(self, images, boxes=None, masks=None, **kwargs) -> BatchFeature:
        return self.preprocess(images, boxes=boxes, masks=masks, **kwargs)

    def preprocess(
        self,
        images: Image.Image | np.ndarray | Sequence[Image.Image | np.ndarray],
        boxes: Any = None,
        masks: Any = None,
        view_selection: str | Sequence[float] | None = None,
        task: str | None = None,
        normalized_boxes: bool = False,
        seed: int | None = None,
        return_tensors: str | None = "pt",
        num_threads: int | None = None,
        **kwargs,
    ) -> BatchFeature:
        r"""Nested views of every region of one image or a batch of images.

        Args:
            images: a PIL image or uint8 array, or a list of them.
            boxes: per image, its region boxes `[R_i, 4]` as `(x1, y1, x2, y2)` in pixels (or fractions of
                the image size with `normalized_boxes=True`). A single image may take its list of boxes
                directly. Boxes partly outside the image are kept as given for the view interpolation and
                clipped to the image for the crops (upstream); boxes at most 1 px wide/high are widened to
                1 px (upstream's polygon rule, docs/upstream/views.md §1).
            masks: instead of boxes, per image its binary masks `[R_i, H, W]`, reduced to boxes with
                upstream's rule (first/last row and column holding a mask pixel, inclusive).
            view_selection: `"image_prior"`, `"random"`, `"task"` or the list of `t` of views 1..V-1;
                default: the processor's `view_selection`.
            task: the task prior for `"task"` (`"attributes"`, `"captioning"`).
            seed: seeds the `"random"` selection (`random.Random(seed)`); `None` uses the global `random`
                module like upstream.
            return_tensors: `"pt"` (default) or `"np"`.
            num_threads: threads that crop, resize and normalise the views (PIL and NumPy release the GIL)
                while the calling thread chooses the views of the next image; `None` (default): one per
                CPU, at most 8; `1`: everything in the calling thread. The outputs do not depend on it.

        Returns:
            [`BatchFeature`] with, for the R regions of all images in order (S = size):
            - `pixel_values` `[R, V, 3, S_h, S_w]` float32;
            - `view_boxes` `[R, V, 4]` float32: the region box in the pixels of each resized view;
            - `view_ratios` `[R, V]` float32: the `t` of each view;
            - `crop_boxes` `[R, V, 4]` int64: the integer crop of each view in the original image;
            - `region_image_index` `[R]` int64: the image each region belongs to;
            - `region_boxes` `[R, 4]` float64: each region's box in image pixels as given (masks reduced to
              boxes), before the widening of tiny boxes; the box its record reports.
        """
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
        if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool)):
            raise TypeError(f"seed must be an integer or None, got {seed!r} ({type(seed).__name__})")
        if return_tensors not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        threads = _thread_count(num_threads)
        view_selection = self.view_selection if view_selection is None else view_selection
        task = self.task if task is None else task
        self.check_view_selection(view_selection, task)
        single = _is_single_image(images)
        if single:
            images = [images]
        elif isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            raise TypeError(
                "images must be a PIL image, a uint8 array or a list of them (load files first, e.g. with "
                f"dynrefer_hf.images.load_rgb_image), got {type(images).__name__}"
            )
        if len(images) == 0:
            raise ValueError("images is empty: give at least one image")
        arrays = [to_rgb_array(image) for image in images]
        regions = self._regions_per_image(arrays, boxes, masks, normalized_boxes, single)
        given_boxes = [given for given, _ in regions]
        regions = [checked for _, checked in regions]
        rng = random.Random(seed) if seed is not None else None

        num_views, out_h, out_w = self.num_views, self.size["height"], self.size["width"]
        num_regions = sum(len(image_regions) for image_regions in regions)
        pixels = np.empty((num_regions * num_views, 3, out_h, out_w), dtype=np.float32)
        all_boxes, all_ratios, all_crops, image_index = [], [], [], []
        threads = min(threads, num_regions * num_views)
        with (
            _single_threaded_blas(),
            ThreadPoolExecutor(max_workers=threads) if threads > 1 else nullcontext() as pool,
        ):
            pending = []
            for index, (image, array, image_regions) in enumerate(zip(images, arrays, regions)):
                if len(image_regions) == 0:
                    continue
                height, width = array.shape[:2]
                # The caller's RGB image is cropped directly; other inputs are converted once.
                is_rgb = isinstance(image, Image.Image) and image.mode == "RGB"
                pil_image = image if is_rgb else Image.fromarray(array)
                box_hash = self._box_hash(array, pil_image, view_selection)
                ratios = np.array(
                    [
                        self._view_ratios(box, width, height, view_selection, task, box_hash, rng)
                        for box in image_regions
                    ]
                )
                crop_boxes = crop_boxes_from_view_boxes(
                    view_boxes(image_regions, ratios, width, height), width, height
                )
                first_slot = len(image_index) * num_views
                slots: dict[tuple[int, ...], list[int]] = {}  # identical crops are built once
                for slot, crop_box in enumerate(map(tuple, crop_boxes.reshape(-1, 4).tolist()), first_slot):
                    slots.setdefault(crop_box, []).append(slot)
                for crop_box, crop_slots in slots.items():
                    if pool is None:
                        self._write_view(pil_image, crop_box, crop_slots, pixels)
                    else:  # resized while the next image's views are chosen
                        pending.append(pool.submit(self._write_view, pil_image, crop_box, crop_slots, pixels))
                all_boxes.append(target_boxes_in_views(crop_boxes[:, 0], crop_boxes, out_h, out_w))
                all_ratios.append(ratios)
                all_crops.append(crop_boxes)
                image_index.extend([index] * len(image_regions))
            for future in pending:
                future.result()

        def stacked(parts: list[np.ndarray], dtype, shape) -> np.ndarray:
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(shape, dtype=dtype)

        data = {
            "pixel_values": torch.from_numpy(pixels.reshape(-1, num_views, 3, out_h, out_w)),
            "view_boxes": torch.from_numpy(stacked(all_boxes, np.float32, (0, num_views, 4))),
            "view_ratios": torch.from_numpy(stacked(all_ratios, np.float32, (0, num_views))),
            "crop_boxes": torch.from_numpy(stacked(all_crops, np.int64, (0, num_views, 4))),
            "region_image_index": torch.tensor(image_index, dtype=torch.int64),
            "region_boxes": torch.from_numpy(stacked(given_boxes, np.float64, (0, 4))),
        }
        if return_tensors == "np":
            data = {key: value.numpy() for key, value in data.items()}
        return BatchFeature(data=data)

    def _box_hash(self, array: np.ndarray, pil_image: Image.Image, view_selection):
        """The box -> hash function of the image prior, or None when no pHash is needed."""
        if view_selection != "image_prior":
            return None
        height, width = array.shape[:2]
        limits = np.array([width, height, width, height], dtype=np.float32)
        if self.phash_method == "imagehash":
            return partial(standard_phash, pil_image)
        phash = region_phasher(array, self.phash_resolution)  # grey once per image
        hashes: dict[tuple[int, ...], np.ndarray] = {}  # e.g. t = 1 is the whole image for every region

        def box_hash(box: np.ndarray) -> np.ndarray:
            # Upstream slices with the unclipped box: identical to clipping except for coordinates <= -1,
            # which NumPy would wrap around to the far side of the image; those are clipped here.
            box = np.clip(box, 0, limits)
            key = tuple(box.astype(np.int64).tolist())
            if key not in hashes:
                hashes[key] = phash(box)
            return hashes[key]

        return box_hash
