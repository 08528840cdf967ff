"""Synthetic scenes of textured shapes: a region dataset that needs both tight and wide views.

Every scene is a 224-448 px image holding 3-8 non-overlapping shapes. Each shape has a class
(circle, square, ...), a colour, a size and a fine texture (solid, striped, dotted, checkered). The
texture period grows slowly with the object (4-16 px), so on small objects it is only resolvable in
a tight, high-resolution view; the caption names the nearest other shape and where it lies
("small red striped circle left of a blue square"), which only a wide view shows. That is the
trade-off DynRefer's nested views address.

Generation is deterministic: scene ``index`` of split ``split`` depends only on
``(seed, split, index)``, so any subset can be rebuilt alone.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from datasets import Dataset, DatasetDict
from PIL import Image, ImageDraw

from ..data.schema import ATTRIBUTE_IGNORE, RegionVocabulary, region_features

__all__ = [
    "CAPTION_FIELDS",
    "CONTEXT_FIELDS",
    "CONTEXT_LABEL_SIZES",
    "SHAPES_SPLITS",
    "SHAPES_VOCABULARY",
    "ShapeObject",
    "ShapesScene",
    "build_shapes_dataset",
    "caption_field_accuracy",
    "context_labels",
    "export_shapes_upstream",
    "generate_scene",
    "nearest_shape",
    "parse_caption",
    "scene_record",
    "shapes_scene",
    "shapes_split",
]

SHAPE_CLASSES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 40),
    "purple": (135, 60, 185),
    "orange": (240, 135, 30),
    "black": (30, 30, 30),
}
TEXTURES = ("solid", "striped", "dotted", "checkered")
SIZES = ("small", "medium", "large")
RELATIONS = ("left of", "right of", "above", "below")
SHAPES_SPLITS = ("train", "validation", "test")

# Object size = longer box side / shorter image side; class edges between small|medium|large.
_RELATIVE_SIZE_RANGE = (0.06, 0.34)
_SIZE_EDGES = (0.13, 0.22)
# Objects this close to an edge get size labels -1 (ambiguous, like OVAD's ignored labels).
_SIZE_AMBIGUITY = 0.01
_IMAGE_SIDE_RANGE = (224, 448)
_OBJECT_COUNT_RANGE = (3, 8)
_PLACEMENT_TRIES = 60

SHAPES_VOCABULARY = RegionVocabulary(
    classes=SHAPE_CLASSES,
    attributes=tuple(
        [f"color:{colour}" for colour in COLOURS]
        + [f"texture:{texture}" for texture in TEXTURES]
        + [f"size:{size}" for size in SIZES]
    ),
    # Tags are the content words of the captions (upstream parses tags out of its captions).
    tags=SIZES + tuple(COLOURS) + TEXTURES + SHAPE_CLASSES,
)


@dataclass(frozen=True)
class ShapeObject:
    """One shape of a scene; ``box`` is its tight ``(x1, y1, x2, y2)`` in pixels (exclusive end)."""

    box: tuple[int, int, int, int]
    shape: str
    colour: str
    texture: str
    size: str
    size_is_ambiguous: bool

    @property
    def centre(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2


@dataclass(frozen=True)
class ShapesScene:
    image: Image.Image
    objects: tuple[ShapeObject, ...]


def _shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """Boolean [height, width] mask of ``shape`` filling a ``width x height`` box."""
    ys, xs = np.mgrid[0:height, 0:width]
    u = (xs + 0.5) / width * 2 - 1  # -1..1 across the box
    v = (ys + 0.5) / height * 2 - 1
    if shape == "circle":
        return u**2 + v**2 <= 1
    if shape == "square":
        return np.ones((height, width), dtype=bool)
    if shape == "triangle":  # apex up
        return np.abs(u) <= (v + 1) / 2
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1
    if shape == "cross":
        return (np.abs(u) <= 0.34) | (np.abs(v) <= 0.34)
    if shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        points = [
            ((1 + r * np.cos(a)) * width / 2, (1 + r * np.sin(a)) * height / 2) for r, a in zip(radii, angles)
        ]
        canvas = Image.new("L", (width, height), 0)
        ImageDraw.Draw(canvas).polygon(points, fill=255)
        return np.asarray(canvas) > 0
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPE_CLASSES}")


def _texture_mask(texture: str, width: int, height: int, period: int) -> np.ndarray:
    """Boolean [height, width] mask of the pattern pixels (drawn in a contrasting colour)."""
    ys, xs = np.mgrid[0:height, 0:width]
    half = max(period // 2, 1)
    if texture == "solid":
        return np.zeros((height, width), dtype=bool)
    if texture == "striped":  # diagonal stripes
        return ((xs + ys) // half) % 2 == 1
    if texture == "checkered":
        return ((xs // half) + (ys // half)) % 2 == 1
    if texture == "dotted":
        dx = xs % period - (period - 1) / 2
        dy = ys % period - (period - 1) / 2
        return dx**2 + dy**2 <= (0.3 * period) ** 2
    raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")


def _size_class(relative_size: float) -> tuple[str, bool]:
    index = int(np.searchsorted(_SIZE_EDGES, relative_size, side="right"))
    ambiguous = any(abs(relative_size - edge) < _SIZE_AMBIGUITY for edge in _SIZE_EDGES)
    return SIZES[index], ambiguous


def _place_boxes(
    rng: np.random.Generator, width: int, height: int, count: int
) -> list[tuple[int, int, int, int]]:
    """Up to ``count`` non-overlapping boxes (with a margin), each tried at shrinking sizes."""
    short_side = min(width, height)
    margin = max(2, short_side // 50)
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(count):
        relative = rng.uniform(*_RELATIVE_SIZE_RANGE)
        aspect = rng.uniform(0.8, 1.25)
        for attempt in range(_PLACEMENT_TRIES):
            scale = relative * (0.85 ** (attempt // 10))
            side = scale * short_side
            box_w = max(8, round(side * min(1.0, aspect)))
            box_h = max(8, round(side * min(1.0, 1 / aspect)))
            x1 = int(rng.integers(0, width - box_w + 1))
            y1 = int(rng.integers(0, height - box_h + 1))
            candidate = (x1, y1, x1 + box_w, y1 + box_h)
            if all(_separated(candidate, other, margin) for other in boxes):
                boxes.append(candidate)
                break
    return boxes


def _separated(a: tuple[int, ...], b: tuple[int, ...], margin: int) -> bool:
    return a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1]


def _pattern_colour(rgb: np.ndarray) -> np.ndarray:
    """White on dark colours, near-black on light ones, so the texture has contrast."""
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return np.array((245, 245, 245) if luminance < 110 else (20, 20, 20), dtype=np.int16)


def generate_scene(rng: np.random.Generator) -> ShapesScene:
    """Draw one scene with ``rng`` (every random choice comes from it, in a fixed order)."""
    width, height = (
        int(side) for side in rng.integers(_IMAGE_SIDE_RANGE[0], _IMAGE_SIDE_RANGE[1] + 1, size=2)
    )
    background = rng.integers(185, 236, size=3)
    canvas = np.empty((height, width, 3), dtype=np.int16)
    canvas[:] = background
    canvas += rng.integers(-6, 7, size=(height, width, 1), dtype=np.int16)  # mild grain

    count = int(rng.integers(_OBJECT_COUNT_RANGE[0], _OBJECT_COUNT_RANGE[1] + 1))
    boxes = _place_boxes(rng, width, height, count)
    objects = []
    for box in boxes:
        shape = SHAPE_CLASSES[rng.integers(len(SHAPE_CLASSES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        texture = TEXTURES[rng.integers(len(TEXTURES))]
        x1, y1, x2, y2 = box
        box_w, box_h = x2 - x1, y2 - y1
        shape_mask = _shape_mask(shape, box_w, box_h)
        period = int(np.clip(round(max(box_w, box_h) / 7), 4, 16))
        pattern_mask = shape_mask & _texture_mask(texture, box_w, box_h, period)
        rgb = np.clip(np.array(COLOURS[colour]) + rng.integers(-12, 13, size=3), 0, 255).astype(np.int16)
        patch = canvas[y1:y2, x1:x2]
        patch[shape_mask] = rgb
        patch[pattern_mask] = _pattern_colour(rgb)
        # The drawn shape may not touch every side of its box (the star): keep the box tight.
        rows, cols = np.flatnonzero(shape_mask.any(axis=1)), np.flatnonzero(shape_mask.any(axis=0))
        tight = (x1 + int(cols[0]), y1 + int(rows[0]), x1 + int(cols[-1]) + 1, y1 + int(rows[-1]) + 1)
        size, ambiguous = _size_class(max(box_w, box_h) / min(width, height))
        objects.append(ShapeObject(tight, shape, colour, texture, size, ambiguous))
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))  # uint8 [H, W, 3]: RGB
    return ShapesScene(image=image, objects=tuple(objects))


def _relation(subject: ShapeObject, reference: ShapeObject) -> str:
    """Where ``subject`` lies relative to ``reference``, along the dominant axis."""
    (sx, sy), (rx, ry) = subject.centre, reference.centre
    if abs(sx - rx) >= abs(sy - ry):
        return RELATIONS[0] if sx < rx else RELATIONS[1]
    return RELATIONS[2] if sy < ry else RELATIONS[3]


def _alternatives(words: Sequence[str]) -> str:
    return "(" + "|".join(re.escape(word) for word in words) + ")"


# The fields of a caption, in caption order: the region's own words, then its context (the nearest shape).
CAPTION_FIELDS = ("size", "colour", "texture", "class", "relation", "neighbour_colour", "neighbour_class")
CONTEXT_FIELDS = ("relation", "neighbour_colour", "neighbour_class")
_CAPTION_PATTERN = re.compile(
    " ".join(
        [
            _alternatives(SIZES),
            _alternatives(COLOURS),
            _alternatives(TEXTURES),
            _alternatives(SHAPE_CLASSES),
            _alternatives(RELATIONS),
            "(?:a|an)",
            _alternatives(COLOURS),
            _alternatives(SHAPE_CLASSES),
        ]
    )
)


def parse_caption(caption: str) -> dict[str, str] | None:
    """The `CAPTION_FIELDS` of a caption of the shapes template, or None if it does not follow the template.

    ``"small red striped circle left of a blue square"`` -> ``{"size": "small", "colour": "red", ...,
    "relation": "left of", "neighbour_colour": "blue", "neighbour_class": "square"}``. Whitespace runs count
    as one space; the article is not checked.
    """
    match = _CAPTION_PATTERN.fullmatch(" ".join(caption.split()))
    return None if match is None else dict(zip(CAPTION_FIELDS, match.groups()))


CONTEXT_LABEL_SIZES = (len(RELATIONS), len(COLOURS), len(SHAPE_CLASSES))
"""Number of classes of each of `context_labels`' labels."""


def context_labels(caption: str) -> list[int]:
    """The context words of a shapes caption as class indices: ``[relation, neighbour colour, neighbour class]``
    (indices into ``RELATIONS``, ``COLOURS``, ``SHAPE_CLASSES``), the extra probe targets of the demonstration
    model (`RegionTrainingCollator`'s ``caption_labels``).

    Raises:
        ValueError: if ``caption`` does not follow the caption template.
    """
    fields = parse_caption(caption)
    if fields is None:
        raise ValueError(f"the caption {caption!r} does not follow the shapes caption template")
    return [
        RELATIONS.index(fields["relation"]),
        list(COLOURS).index(fields["neighbour_colour"]),
        SHAPE_CLASSES.index(fields["neighbour_class"]),
    ]


def caption_field_accuracy(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Per-word accuracy of predicted shapes captions against their references (one reference each).

    For every field of `CAPTION_FIELDS`, the fraction of regions whose predicted caption names it right; a
    prediction that does not follow the caption template (`parse_caption` gives None) counts as wrong in
    every field. Also ``"well_formed"`` (the fraction of predictions that follow the template) and
    ``"all"`` (every field right). Fractions in [0, 1].

    Raises:
        ValueError: different lengths, no region, or a reference that does not follow the template.
    """
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("caption_field_accuracy needs at least one region")
    right = dict.fromkeys((*CAPTION_FIELDS, "well_formed", "all"), 0)
    for prediction, reference in zip(predictions, references):
        truth = parse_caption(reference)
        if truth is None:
            raise ValueError(f"the reference {reference!r} does not follow the shapes caption template")
        parsed = parse_caption(prediction)
        if parsed is None:
            continue
        right["well_formed"] += 1
        right["all"] += parsed == truth
        for name in CAPTION_FIELDS:
            right[name] += parsed[name] == truth[name]
    return {name: count / len(references) for name, count in right.items()}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def nearest_shape(objects: Sequence[ShapeObject], index: int) -> ShapeObject:
    """The object nearest to ``objects[index]`` (centre to centre; the first on a tie): the one its caption names."""
    cx, cy = objects[index].centre
    distances = [
        np.inf if other_index == index else (other.centre[0] - cx) ** 2 + (other.centre[1] - cy) ** 2
        for other_index, other in enumerate(objects)
    ]
    return objects[int(np.argmin(distances))]


def scene_record(scene: ShapesScene, image_id: int) -> dict:
    """The region-schema record (docs/data.md) of ``scene``."""
    captions, tags, attributes = [], [], []
    for index, obj in enumerate(scene.objects):
        reference = nearest_shape(scene.objects, index)
        captions.append(
            f"{obj.size} {obj.colour} {obj.texture} {obj.shape} {_relation(obj, reference)} "
            f"{_article(reference.colour)} {reference.colour} {reference.shape}"
        )
        words = {obj.size, obj.colour, obj.texture, obj.shape, reference.colour, reference.shape}
        tags.append([tag for tag in SHAPES_VOCABULARY.tags if tag in words])
        labels = []
        for group, value in zip(SHAPES_VOCABULARY.attribute_groups, SHAPES_VOCABULARY.attribute_values):
            own_value = {"color": obj.colour, "texture": obj.texture, "size": obj.size}[group]
            if group == "size" and obj.size_is_ambiguous:
                labels.append(ATTRIBUTE_IGNORE)
            else:
                labels.append(int(value == own_value))
        attributes.append(labels)
    return {
        "image_id": image_id,
        "image": scene.image,
        "boxes": [[float(value) for value in obj.box] for obj in scene.objects],
        "captions": captions,
        "tags": tags,
        "attributes": attributes,
        "classes": [SHAPE_CLASSES.index(obj.shape) for obj in scene.objects],
    }


def shapes_scene(split: str, index: int, seed: int = 0) -> ShapesScene:
    """Scene ``index`` of ``split``: the one `shapes_split` stores at that index, without the PNG round trip."""
    if split not in SHAPES_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SHAPES_SPLITS}")
    return generate_scene(np.random.default_rng([seed, SHAPES_SPLITS.index(split), index]))


def _png_bytes(image: Image.Image) -> bytes:
    # Lossless, like datasets' own encoding, but at the fastest zlib level: the grain makes level 6 4x slower.
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def shapes_split(split: str, num_images: int, seed: int = 0, start: int = 0) -> Dataset:
    """Scenes ``start .. start + num_images - 1`` of ``split`` as a ``datasets.Dataset``."""
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    records = []
    for index in range(start, start + num_images):
        record = scene_record(shapes_scene(split, index, seed), image_id=index)
        records.append({**record, "image": {"bytes": _png_bytes(record["image"]), "path": None}})
    columns = {key: [record[key] for record in records] for key in records[0]}
    return Dataset.from_dict(columns, features=region_features(SHAPES_VOCABULARY), split=split)


def build_shapes_dataset(
    num_train: int = 2000, num_validation: int = 200, num_test: int = 200, seed: int = 0
) -> DatasetDict:
    """The shapes dataset with train / validation / test splits (independent scenes per split)."""
    sizes = {"train": num_train, "validation": num_validation, "test": num_test}
    return DatasetDict({split: shapes_split(split, size, seed) for split, size in sizes.items()})


def export_shapes_upstream(
    output_dir, num_images: int, seed: int = 0, split: str = "test", one_region_per_image: bool = False
) -> str:
    """Write ``num_images`` shapes scenes of ``split`` as an upstream annotation file ``output_dir/annotations.json``
    with the images in ``output_dir/images`` (`dynrefer_hf.data.write_upstream_annotations`; no tags, since the
    shapes words are not all RAM tags). ``one_region_per_image``: the region-captioning layout (RefCOCOg, VG).
    Returns the annotation file's path."""
    import os

    from ..data.upstream import write_upstream_annotations

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "annotations.json")
    write_upstream_annotations(
        shapes_split(split, num_images, seed=seed),
        SHAPES_VOCABULARY,
        path,
        os.path.join(output_dir, "images"),
        one_region_per_image=one_region_per_image,
        tags=False,
    )
    return path
