"""The ``region-captioning`` pipeline: images and their regions in, one description per region out.

``import dynrefer_hf`` registers the task, so that::

    from transformers import pipeline

    describe = pipeline("region-captioning", model="path/or/repo-id")
    describe("photo.jpg", boxes=[[10, 20, 200, 180], [150, 40, 320, 300]])

returns, for every region, ``{"box", "caption", "score", "tags", "attributes", "label"}``.
Any number of regions per image is accepted; they are run through the model ``batch_size`` regions
at a time, so memory stays bounded, and a region's result does not depend on which other regions
share its chunk (see ``RegionCaptioningPipeline``).
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import PIL.Image
from transformers import GenerationMixin
from transformers.pipelines.base import ChunkPipeline
from transformers.utils import logging

from ..image_processing_dynrefer import as_region_boxes
from ..images import DEFAULT_DOWNLOAD_TIMEOUT, load_rgb_image
from ..precision import resolve_precision, set_precision
from ..pretrained import SHAPES_DEMO_PATH
from ..segmentation import PointSegmenter, mask_to_rle, region_points
from ..validation import (
    binary_masks,
    check_bool,
    check_count,
    check_number,
    check_probability,
    check_top_k,
)

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_REGION_BATCH_SIZE",
    "TASK",
    "ModelSource",
    "RegionCaptioningPipeline",
    "register_pipeline",
]

class ModelSource(NamedTuple):
    """A model to load: a Hub id or local folder and its revision, the pair a pipeline task's default is.

    Not a path itself: load it with ``AutoModel.from_pretrained(source.name_or_path, revision=source.revision)``.
    """

    name_or_path: str
    revision: str | None = None


# The model that `pipeline("region-captioning")` and the `dynrefer` command use when none is named, the
# single place to change it. Now the demonstration model shipped in the package (its folder:
# `dynrefer_hf.SHAPES_DEMO_PATH`; docs/demo_model.md), so that it works offline; the converted release
# checkpoint is "callsys/dynrefer" (pass it as `model`).
DEFAULT_MODEL = ModelSource(str(SHAPES_DEMO_PATH))

TASK = "region-captioning"

# Upstream describes regions in chunks of 20 (`split_size`, docs/upstream/model.md §16).
DEFAULT_REGION_BATCH_SIZE = 20

# The keyword arguments of `generate` itself (logits_processor, streamer, ...), besides GenerationConfig fields.
_GENERATE_ARGUMENTS = frozenset(inspect.signature(GenerationMixin.generate).parameters) - {"self", "kwargs"}

# Marks a parameter the caller did not pass (where `None` is a meaningful value).
_NOT_GIVEN = object()
# Marks the end of a prefetched iterator.
_END = object()

# A notice logged when the embedded demonstration model is loaded (the `dynrefer` command prints it itself).
DEMO_MODEL_NOTICE = (
    "using the demonstration model shipped with dynrefer_hf, trained on synthetic shapes scenes, not the "
    "paper's model: its captions describe coloured shapes only; docs/converting.md says how to get the "
    "released DynRefer weights"
)

# Written in a corner of the pictures drawn from the demonstration model's results (`dynrefer caption --draw`).
DEMO_MODEL_MARK = "dynrefer_hf demonstration model (shapes), not the paper's"

logger = logging.get_logger(__name__)

def _prefetched(items: Iterator[Any]) -> Iterator[Any]:
    """The items of ``items``, each next one computed in a background thread while the caller uses the current one.

    The pipeline builds the views of the next chunk while the model describes the current one. Items
    are computed one at a time and in order; an exception raised computing one is raised here, when it
    is due.
    """
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="region-captioning-views") as worker:
            upcoming = worker.submit(next, items, _END)
            while (item := upcoming.result()) is not _END:
                upcoming = worker.submit(next, items, _END)
                yield item
    finally:
        items.close()


def _region_controls(controls, num_regions: int) -> list | None:
    """One entry of user control words per region (a comma-separated string or a list of words), or None.

    ``controls`` is a string or a list of words, used for every region of the image, or a list with
    one string / list of words (or None) per region. The model splits strings on commas and drops
    empty words (``prompts.merge_control_words``).
    """
    if controls is None:
        return None
    if not isinstance(controls, (str, list, tuple)):
        raise TypeError(
            "controls must be a comma-separated string, a list of words, or one of those per region, "
            f"got {type(controls).__name__}"
        )
    if isinstance(controls, str) or all(isinstance(words, str) for words in controls):
        return [controls] * num_regions
    if len(controls) != num_regions:
        raise ValueError(f"controls has {len(controls)} entries but the image has {num_regions} regions")
    for words in controls:
        if words is not None and (
            not isinstance(words, (str, list, tuple)) or not all(isinstance(word, str) for word in words)
        ):
            raise TypeError(f"the controls of a region must be a string or a list of words, got {words!r}")
    return [words or [] for words in controls]


def register_pipeline() -> None:
    """Register ``RegionCaptioningPipeline`` as the transformers task ``"region-captioning"``.

    Called once by ``import dynrefer_hf``.
    """
    from transformers.pipelines import PIPELINE_REGISTRY

    from ..modeling_dynrefer import DynReferForRegionCaptioning

    PIPELINE_REGISTRY.register_pipeline(
        TASK,
        pipeline_class=RegionCaptioningPipeline,
        pt_model=DynReferForRegionCaptioning,
        default={"model": DEFAULT_MODEL},
        type="multimodal",
    )


def _is_demo_model(name_or_path: str | os.PathLike | None) -> bool:
    """Whether ``name_or_path`` is the demonstration model shipped in the package."""
    return bool(name_or_path) and os.path.realpath(os.fspath(name_or_path)) == os.path.realpath(
        SHAPES_DEMO_PATH
    )


def _count_regions(item: Mapping[str, Any]) -> int:
    """How many regions an input dict holds (a single box [4] or mask [H, W] counts as one)."""
    try:
        if "boxes" in item:
            shape = np.shape(item["boxes"])
            return 1 if len(shape) == 1 else shape[0]
        shape = np.shape(item["masks"])
        return 1 if len(shape) == 2 else shape[0]
    except (ValueError, IndexError):  # malformed regions: `preprocess` names the problem
        return 1


class RegionCaptioningPipeline(ChunkPipeline):
    """Describe image regions with a DynRefer model: a caption, its score, tags, attributes and a class.

    Call it with an image (a path, URL, PIL image or ``[H, W, 3]`` uint8 array) and its regions::

        pipe(image, boxes=[[x1, y1, x2, y2], ...])       # -> [region result, ...]
        pipe(image, masks=bool_array_n_h_w)              # regions as masks
        pipe(image, points=[[120, 80]], segmenter="facebook/sam-vit-base")  # regions as clicks
        pipe([image_a, image_b], boxes=[boxes_a, boxes_b])  # -> [[...], [...]]
        pipe([{"image": image_a, "boxes": boxes_a, "controls": "red"}, ...])

    Keyword arguments:
        boxes / masks: the regions of each image, xyxy pixel boxes [N, 4] or boolean masks [N, H, W].
        points / point_labels: the regions as clicks, ``[[x, y], ...]`` pixels, a list of points per
            region for several, with labels 1 (on the object, default) or 0 (not on it); the segmenter
            makes one mask per region (``segmentation.region_points``), described as ``masks`` are.
        segmenter: a SAM / SAM 2 folder or Hub id (or a ``segmentation.PointSegmenter``) for ``points``;
            also a ``pipeline(...)`` argument, which loads it once, on the pipeline's device and dtype.
        return_masks: add each region's mask as COCO run-length encoding (``"mask"``: {"size", "counts"},
            ``pycocotools.mask.decode`` reads it); needs ``masks`` or ``points``.
        controls: user control words put before the predicted tags in the control prompt: a
            comma-separated string or a list of words for every region, or a list with one string
            or list of words per region.
        batch_size: regions per forward pass (default 20). Results do not depend on it.
        view_selection, task: passed to the image processor (how the nested views are chosen).
        tag_threshold: probability above which a tag is predicted (default: the model's).
        attribute_top_k: how many attributes to return per region (default 5, ``None`` for all).
        return_views: add each region's selected views (``"views"``: ratios, crop and view boxes).
        generate_captions: ``False`` for the heads only (tags, attributes, class; no ``caption`` or ``score``),
            without running the language model (``model.label_regions``).
        timeout: seconds an image download may wait for the server (default 30, ``None``: forever).
        exif_orientation: turn image files and downloads as their EXIF orientation tag says (default
            ``True``, as photo viewers do); ``False`` for upstream's stored pixel order.
        dtype (``pipeline(...)`` argument): ``"auto"`` (default) runs the model at the machine's precision
            (``dynrefer_hf.precision``: bfloat16 on CPUs with AMX/AVX512-BF16, upstream's on CUDA, else float32);
            a dtype loads at that dtype; a model object passed in is used as it is.
            int8: ``model_kwargs={"quantization_config": dynrefer_hf.precision.quantization_config("int8")}``.
        allow_missing_weights (``pipeline(...)`` argument): use a checkpoint that lacks some of the model's tensors
            (they would be random); refused by default, naming them.
        progress_bar: ``True``/``False``, or ``None`` (default) for a bar on a terminal when the
            call needs more than one forward pass.
        generate_kwargs, max_new_tokens, num_beams, ...: generation parameters.

    Each region gives ``{"box": [x1, y1, x2, y2], "caption": str, "score": float, "tags": [str],
    "attributes": [{"name": str, "score": float}], "label": {"name": str, "score": float}}``.
    ``score`` is the caption's sequence probability; attribute scores are probabilities; the label
    score is the open-vocabulary matching score of the best class (higher is better, not a probability).

    Each chunk is ``model.generate(**processor(...))`` post-processed by
    ``processor.post_process_region_captioning``: the pipeline gives exactly what that conventional call gives.

    Chunks are independent: a region's view selection, tags and caption never depend on which
    other regions share its forward pass (the control prompts are padded per chunk, and padding is
    masked), so chunked and unchunked calls give the same results up to float rounding.
    """

    # the DynReferProcessor (image processor + tokenizer) does the text and image work, as in BLIP-2's pipelines
    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    _pipeline_calls_generate = True

    def __init__(self, *args, allow_missing_weights: bool = False, segmenter=None, **kwargs):
        super().__init__(*args, **kwargs)
        # loaded by `pipeline(...)` with dtype="auto" (the default): the machine's precision (precision.py); a model
        # object passed in is used as it is
        if getattr(self.model, "machine_precision_pending", False) and getattr(self.model, "hf_quantizer", None) is None:
            set_precision(self.model, resolve_precision("auto", self.device)[0])
            self.model.machine_precision_pending = False
        self.segmenter = None if segmenter is None else self._load_segmenter(segmenter)
        missing = list(getattr(self.model, "missing_weights", None) or [])
        if missing and not check_bool("allow_missing_weights", allow_missing_weights):
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise ValueError(
                f"the checkpoint {self.model.name_or_path} lacks {len(missing)} of the model's tensors, which would "
                f"be random: {shown}; pass allow_missing_weights=True to use it anyway"
            )
        if self.processor is None:
            raise ValueError(
                "the region-captioning pipeline needs a DynReferProcessor: pass processor=, or a model folder or "
                "repository that holds processor_config.json"
            )
        if self.model.config.control_prompt_tokens is None:  # a folder saved before the table existed
            self.model.config.control_prompt_tokens = self.processor.tokenize_tag_vocabulary(
                self.model.config.tag_names
            )
        if _is_demo_model(self.model.name_or_path):
            logger.warning(DEMO_MODEL_NOTICE)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save the model and its processor into ``save_directory``, from which
        ``pipeline("region-captioning", model=save_directory)`` loads the same pipeline back.

        Unlike ``Pipeline.save_pretrained`` no pipeline code is copied and no ``custom_pipelines`` entry is
        written: the task is part of this package, registered by ``import dynrefer_hf``, so the folder
        loads without ``trust_remote_code``. ``push_to_hub`` saves through this method too. Keyword
        arguments go to every ``save_pretrained`` (e.g. ``max_shard_size``).
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory must be a folder, but {save_directory} is a file")
        os.makedirs(save_directory, exist_ok=True)
        self.model.save_pretrained(save_directory, **kwargs)
        self.processor.save_pretrained(save_directory, **kwargs)

    def __call__(
        self,
        images,
        boxes=None,
        masks=None,
        controls=None,
        batch_size=None,
        points=None,
        point_labels=None,
        segmenter=None,
        return_masks=False,
        **kwargs,
    ):
        """Describe the regions of one image (returns a list of region results) or of a list of images
        (returns one such list per image). See the class docstring for the arguments."""
        if points is not None or point_labels is not None:
            images, masks = self._segment_points(images, boxes, masks, points, point_labels, segmenter, kwargs)
        elif segmenter is not None:
            raise ValueError("segmenter= is used with points=: give the points to segment")
        region_batch_size = (
            batch_size if batch_size is not None else self._batch_size or DEFAULT_REGION_BATCH_SIZE
        )
        region_batch_size = check_count("batch_size", region_batch_size)
        if isinstance(images, (list, tuple)) and len(images) == 0:
            raise ValueError("images is empty: give at least one image")
        inputs = self._gather_inputs(images, boxes, masks, controls)
        items = inputs if isinstance(inputs, list) else [inputs] if isinstance(inputs, dict) else None
        progress = None
        if items is not None:
            num_regions = sum(_count_regions(item) for item in items)
            progress_bar = check_bool("progress_bar", kwargs.pop("progress_bar", None), allow_none=True)
            progress = self._progress_bar(progress_bar, num_regions, region_batch_size)
        elif kwargs.pop("progress_bar", None):
            raise ValueError(
                "progress_bar needs a single image or a list of images, not a dataset or generator"
            )
        if check_bool("return_masks", return_masks) and (
            items is None or any(item.get("masks") is None for item in items)
        ):
            raise ValueError("return_masks=True needs the regions of every image as masks= or points=")
        try:
            results = super().__call__(
                inputs, batch_size=1, region_batch_size=region_batch_size, progress=progress, **kwargs
            )
        finally:
            if progress is not None:
                progress.close()
        if return_masks:
            per_image = [results] if isinstance(inputs, dict) else results
            for item, image_results in zip(items, per_image):
                masks = np.asarray(binary_masks(item["masks"]))  # checked by the run above
                for result, mask in zip(image_results, masks.reshape(-1, *masks.shape[-2:])):
                    result["mask"] = mask_to_rle(mask)
        return results

    def _load_segmenter(self, segmenter):
        """A ``PointSegmenter`` as given, or loaded from a folder or Hub id on the pipeline's device and dtype."""
        if isinstance(segmenter, PointSegmenter):
            return segmenter
        if not isinstance(segmenter, (str, os.PathLike)):
            raise TypeError(
                f"segmenter must be a SAM / SAM 2 folder or Hub id or a PointSegmenter, got {type(segmenter).__name__}"
            )
        return PointSegmenter.from_pretrained(segmenter, device=self.device, dtype=self.dtype)

    def _segment_points(self, images, boxes, masks, points, point_labels, segmenter, kwargs):
        """The images (loaded) and one mask per region from the segmenter, for ``points``/``point_labels``."""
        if boxes is not None or masks is not None:
            raise ValueError("give the regions as boxes, masks or points, only one of them")
        if points is None:
            raise ValueError("point_labels is given without points: pass points=[[x, y], ...] (pixels)")
        segmenter = self.segmenter if segmenter is None else self._load_segmenter(segmenter)
        if segmenter is None:
            raise ValueError(
                "points need a segmenter: pass segmenter= (a SAM / SAM 2 folder or Hub id, e.g. "
                "facebook/sam-vit-base) to pipeline(...) or to the call"
            )
        several = isinstance(images, (list, tuple))
        image_list, points_list = (images, points) if several else ([images], [points])
        labels_list = point_labels if several and point_labels is not None else [point_labels] * len(image_list)
        if several and not (len(points) == len(image_list) and len(labels_list) == len(image_list)):
            raise ValueError(
                f"points (and point_labels) must hold one entry per image: got {len(points)} for {len(image_list)} images"
            )
        loaded = [
            load_rgb_image(
                image,
                timeout=kwargs.get("timeout", DEFAULT_DOWNLOAD_TIMEOUT),
                exif_orientation=kwargs.get("exif_orientation", True),
            )
            for image in image_list
        ]
        masks = [
            segmenter(image, region_points(image_points, image_labels))
            for image, image_points, image_labels in zip(loaded, points_list, labels_list)
        ]
        return (loaded, masks) if several else (loaded[0], masks[0])

    @staticmethod
    def _gather_inputs(images, boxes, masks, controls):
        """Pack the call's arguments into one dict per image: {"image", "boxes" | "masks", "controls"}."""
        if boxes is not None and masks is not None:
            raise ValueError("give the regions either as boxes or as masks, not both")
        regions_key, regions = ("boxes", boxes) if boxes is not None else ("masks", masks)

        def pack(item, item_regions):
            packed = dict(item) if isinstance(item, Mapping) else {"image": item}
            if "image" not in packed:
                raise ValueError("an input dict needs an 'image' key")
            if item_regions is not None:
                packed[regions_key] = item_regions
            if "boxes" in packed and "masks" in packed:
                raise ValueError("give the regions either as boxes or as masks, not both")
            if "boxes" not in packed and "masks" not in packed:
                raise ValueError(
                    "no regions given: pass boxes=[[x1, y1, x2, y2], ...] (pixels) or masks=[N, H, W] for each image"
                )
            if controls is not None and "controls" not in packed:
                packed["controls"] = controls
            return packed

        if isinstance(images, (list, tuple)):
            if regions is not None and not hasattr(regions, "__len__"):
                raise TypeError(f"{regions_key} must hold one entry per image, got {type(regions).__name__}")
            if regions is not None and len(regions) != len(images):
                raise ValueError(
                    f"{regions_key} must hold one entry per image: got {len(regions)} for {len(images)} images"
                )
            return [pack(item, None if regions is None else regions[i]) for i, item in enumerate(images)]
        if isinstance(images, (Mapping, str, os.PathLike, PIL.Image.Image, np.ndarray)):
            return pack(images, regions)
        if images is None or isinstance(images, (int, float, bytes)) or not hasattr(images, "__iter__"):
            raise TypeError(
                "images must be an image (a path, URL, PIL image or array), a list of them, or a dataset of input "
                f"dicts, got {type(images).__name__}"
            )
        if regions is not None:
            raise ValueError("boxes/masks can only be given with an image or a list of images")
        return images  # a dataset or generator of input dicts, handled lazily by `preprocess`

    @staticmethod
    def _progress_bar(progress_bar: bool | None, num_regions: int, region_batch_size: int):
        if progress_bar is False or (progress_bar is None and num_regions <= region_batch_size):
            return None
        # `disable=None` shows the bar only on a terminal; HF's global progress-bar switch applies too.
        return logging.tqdm(
            total=num_regions,
            unit="region",
            desc="region-captioning",
            disable=None if progress_bar is None else False,
        )

    def _sanitize_parameters(
        self,
        region_batch_size=None,
        progress=None,
        view_selection=None,
        task=None,
        timeout=None,
        tag_threshold=None,
        generate_kwargs=None,
        attribute_top_k=_NOT_GIVEN,
        return_views=None,
        exif_orientation=None,
        generate_captions=None,
        **kwargs,
    ):
        # Every parameter is checked here, before any image is loaded or any region run.
        preprocess_params = {}
        if region_batch_size is not None:
            preprocess_params["region_batch_size"] = check_count("batch_size", region_batch_size)
        if view_selection is not None or task is not None:
            image_processor = self.processor.image_processor
            image_processor.check_view_selection(
                image_processor.view_selection if view_selection is None else view_selection,
                image_processor.task if task is None else task,
            )
        image_processor_kwargs = {"view_selection": view_selection, "task": task}
        preprocess_params["image_processor_kwargs"] = {
            k: v for k, v in image_processor_kwargs.items() if v is not None
        }
        if timeout is not None:
            preprocess_params["timeout"] = check_number("timeout", timeout, 0.0, low_open=True)
        if exif_orientation is not None:
            preprocess_params["exif_orientation"] = check_bool("exif_orientation", exif_orientation)

        if generate_kwargs is not None and not isinstance(generate_kwargs, Mapping):
            raise TypeError(f"generate_kwargs must be a dict, got {type(generate_kwargs).__name__}")
        generate_kwargs = dict(generate_kwargs or {})
        for name, value in kwargs.items():
            if name in generate_kwargs:
                raise ValueError(
                    f"'{name}' is given twice, in generate_kwargs and as a parameter: use only one"
                )
            generate_kwargs[name] = value
        self._check_generate_kwargs(generate_kwargs)
        forward_params = {"progress": progress}
        if generate_kwargs:
            forward_params["generate_kwargs"] = generate_kwargs
        if tag_threshold is not None:
            forward_params["tag_threshold"] = check_probability("tag_threshold", tag_threshold)
        if generate_captions is not None:
            forward_params["generate_captions"] = check_bool("generate_captions", generate_captions)
            if not generate_captions and generate_kwargs:
                raise ValueError(
                    f"generation parameters {sorted(generate_kwargs)} were given with generate_captions=False, "
                    "which runs no generation"
                )

        postprocess_params = {}
        if attribute_top_k is not _NOT_GIVEN:
            postprocess_params["attribute_top_k"] = check_top_k("attribute_top_k", attribute_top_k)
        if return_views is not None:
            postprocess_params["return_views"] = check_bool("return_views", return_views)
        return preprocess_params, forward_params, postprocess_params

    def _check_generate_kwargs(self, generate_kwargs: dict[str, Any]) -> None:
        """Refuse unknown or out-of-range generation parameters before any work (``GenerationConfig.validate``)."""
        if generate_kwargs.get("num_return_sequences", 1) != 1:
            raise ValueError(
                "num_return_sequences must be 1: the pipeline returns one caption per region, got "
                f"{generate_kwargs['num_return_sequences']!r}"
            )
        for name in ("max_new_tokens", "num_beams", "max_length", "min_new_tokens", "top_k"):
            if generate_kwargs.get(name) is not None:
                check_count(
                    name, generate_kwargs[name], minimum=0 if name in ("min_new_tokens", "top_k") else 1
                )
        for name in ("temperature", "repetition_penalty"):
            if generate_kwargs.get(name) is not None:
                check_number(name, generate_kwargs[name], 0.0, low_open=True)
        if generate_kwargs.get("top_p") is not None:
            check_number("top_p", generate_kwargs["top_p"], 0.0, 1.0, low_open=True)
        config = copy.deepcopy(self.model.generation_config)
        unknown = set(config.update(**generate_kwargs)) - _GENERATE_ARGUMENTS
        if unknown:
            raise TypeError(
                f"unknown parameter(s) {sorted(unknown)}: the pipeline takes the arguments of its class "
                "docstring and generation parameters (transformers.GenerationConfig)"
            )
        try:
            config.validate()
        except ValueError as error:
            raise ValueError(f"invalid generation parameters: {error}") from None

    def preprocess(
        self,
        inputs: Mapping[str, Any],
        region_batch_size: int = DEFAULT_REGION_BATCH_SIZE,
        image_processor_kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = DEFAULT_DOWNLOAD_TIMEOUT,
        exif_orientation: bool = True,
    ) -> Iterable[dict[str, Any]]:
        """The chunks of ``region_batch_size`` regions, the next one prepared while the model runs on the current one."""
        return _prefetched(
            self._chunks(inputs, region_batch_size, image_processor_kwargs, timeout, exif_orientation)
        )

    def _chunks(
        self,
        inputs: Mapping[str, Any],
        region_batch_size: int,
        image_processor_kwargs: Mapping[str, Any] | None,
        timeout: float | None,
        exif_orientation: bool,
    ) -> Iterator[dict[str, Any]]:
        if not isinstance(inputs, Mapping) or "image" not in inputs:
            raise ValueError("each input must be an image or a dict with 'image' and 'boxes' or 'masks'")
        image = load_rgb_image(inputs["image"], timeout=timeout, exif_orientation=exif_orientation)
        if inputs.get("boxes") is None and inputs.get("masks") is None:
            raise ValueError("no regions given: pass boxes=[[x1, y1, x2, y2], ...] or masks=[N, H, W]")
        boxes = as_region_boxes(
            inputs.get("boxes"), inputs.get("masks"), image_size=(image.height, image.width), where="regions"
        )
        num_regions = len(boxes)
        if num_regions == 0:
            raise ValueError(f"{'boxes' if inputs.get('boxes') is not None else 'masks'} is empty: give at least one region")
        controls = _region_controls(inputs.get("controls"), num_regions)

        for start in range(0, num_regions, region_batch_size):
            stop = min(start + region_batch_size, num_regions)
            try:
                features = self.processor(
                    images=image,
                    boxes=[boxes[start:stop]],
                    controls=None if controls is None else controls[start:stop],
                    return_tensors="pt",
                    **(image_processor_kwargs or {}),
                )
            except ValueError as error:
                if start == 0:
                    raise
                # The processor numbers regions within the chunk it was given.
                raise ValueError(f"{error} (region numbers counted from region {start})") from error
            yield {"inputs": features, "is_last": stop == num_regions}

    def _forward(self, model_inputs, generate_kwargs=None, tag_threshold=None, progress=None, generate_captions=True):
        inputs = dict(model_inputs["inputs"])
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        if generate_captions:
            outputs = self.model.generate(
                **inputs, tag_threshold=tag_threshold, **self._prepare_generate_kwargs(generate_kwargs or {})
            )
            outputs.language_model_outputs = None  # per-step scores: not needed for the records
        else:
            outputs = self.model.label_regions(**inputs, tag_threshold=tag_threshold)
        if progress is not None:
            progress.update(len(inputs["pixel_values"]))
        return {"outputs": outputs, "inputs": model_inputs["inputs"], "is_last": model_inputs["is_last"]}

    def postprocess(self, model_outputs, attribute_top_k: int | None = 5, return_views: bool = False):
        results = []
        for chunk in model_outputs:  # every chunk holds regions of one image
            (records,) = self.processor.post_process_region_captioning(
                chunk["outputs"], chunk["inputs"], self.model.config, attribute_top_k, return_views
            )
            results.extend(records)
        return results
