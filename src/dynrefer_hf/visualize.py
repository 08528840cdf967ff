"""Pictures of region descriptions: boxes with their captions, and the nested views DynRefer looked at.

Only Pillow is used, with its built-in font (``ImageFont.load_default``), so nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import PIL.Image
from PIL import ImageDraw, ImageFilter, ImageFont

__all__ = ["REGION_COLORS", "draw_clicks", "draw_regions", "draw_views", "label_sizes", "region_color"]

# Distinct, saturated colours (Tableau 10), cycled over the regions.
REGION_COLORS: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)


def region_color(index: int) -> tuple[int, int, int]:
    """The colour of region ``index`` (cycles through ``REGION_COLORS``)."""
    return REGION_COLORS[index % len(REGION_COLORS)]


def _text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white, whichever reads better on ``background`` (ITU-R BT.601 luma)."""
    luma = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return (0, 0, 0) if luma > 150 else (255, 255, 255)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, max_width: float) -> str:
    """``text``, shortened with an ellipsis so that it is at most ``max_width`` pixels wide."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "…", font=font) > max_width:
        text = text[:-1]
    return text + "…"


Rect = tuple[int, int, int, int]  # x1, y1, x2, y2, exclusive at x2 / y2


def _overlaps(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _crosses_outline(band: Rect, box: Rect, line_width: int) -> bool:
    """Whether ``band`` covers part of ``box``'s outline (a band wholly inside the box, clear of its
    outline, does not: a caption inside a larger box hides none of it)."""
    inside = (box[0] + line_width, box[1] + line_width, box[2] - line_width, box[3] - line_width)
    wholly_inside = (
        inside[0] <= band[0] and inside[1] <= band[1] and band[2] <= inside[2] and band[3] <= inside[3]
    )
    return _overlaps(band, box) and not wholly_inside


def _band(anchor: str, x: int, y: int, width: int, height: int) -> Rect:
    return (x, y, x + width, y + height) if anchor == "left" else (x - width, y, x, y + height)


def _widest_free_band(
    anchor: str,
    x: int,
    y: int,
    height: int,
    limit: int,
    boxes: list[Rect],
    bands: list[Rect],
    line_width: int,
) -> int:
    """The widest band (at most ``limit``) starting at ``x`` (``anchor`` "left") or ending there ("right")
    that crosses no outline of ``boxes`` and overlaps none of ``bands`` (found by bisection: a wider band
    covers whatever a narrower one does)."""

    def free(width: int) -> bool:
        band = _band(anchor, x, y, width, height)
        return not any(_crosses_outline(band, box, line_width) for box in boxes) and not any(
            _overlaps(band, other) for other in bands
        )

    low, high = 0, max(limit, 0)
    if free(high):
        return high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if free(middle) else (low, middle)
    return low


def _label(
    draw: ImageDraw.ImageDraw,
    box: Rect,
    text: str,
    color,
    font,
    image_size: tuple[int, int],
    other_boxes: list[Rect],
    taken: list[Rect],
    line_width: int,
    min_text: str,
) -> None:
    """Write ``text`` on a band of ``color`` by ``box``: above it, inside its top edge or below it, starting
    at its left edge or ending at its right edge, at the first of these places where the band crosses no
    other box's outline and no band already written (``taken``, which gets this band). Where the whole text
    fits nowhere, it is shortened (with an ellipsis) to the widest free place; where that leaves hardly any
    of it, the band holds ``min_text`` (the region's number) alone, at the widest free place, or, where even
    that is taken, at the first place that fits in the image."""
    width, height = image_size
    padding = max(1, round(font.size * 0.25))
    _, top, _, bottom = draw.textbbox((0, 0), "Ag", font=font)
    band_height = bottom - top + 2 * padding

    def band_width(label: str) -> int:
        return round(draw.textlength(label, font=font)) + 2 * padding

    rows = [y for y in (box[1] - band_height, box[1] + line_width, box[3]) if 0 <= y <= height - band_height]
    rows = rows or [max(0, height - band_height)]
    places = [("left", min(max(box[0], 0), width), y) for y in rows]
    places += [("right", max(min(box[2], width), 0), y) for y in rows]
    room = [
        _widest_free_band(
            anchor, x, y, band_height, x if anchor == "right" else width - x, other_boxes, taken, line_width
        )
        for anchor, x, y in places
    ]
    wanted = band_width(text)
    chosen = next((i for i, free in enumerate(room) if free >= wanted), None)
    if chosen is None:
        chosen = max(range(len(places)), key=lambda i: room[i])  # the first of the widest
        shortened = _fit_text(draw, text, font, room[chosen] - 2 * padding)
        if len(shortened) >= len(min_text) + 8:  # the number, ": " and a few words' worth of the caption
            text = shortened
        else:
            text = min_text
            if room[chosen] < band_width(min_text):  # no free place even for the number
                chosen = 0
    anchor, x, y = places[chosen]
    band = _band(anchor, x, y, band_width(text), band_height)
    if band[0] < 0 or band[2] > width:  # only the number's fallback can stick out: move it into the image
        band = (max(0, min(band[0], width - (band[2] - band[0]))), band[1], 0, band[3])
        band = (band[0], band[1], band[0] + band_width(text), band[3])
    taken.append(band)
    draw.rectangle((band[0], band[1], band[2] - 1, band[3] - 1), fill=color, outline=_text_color(color))
    text_left = draw.textbbox((0, 0), text, font=font)[0]
    draw.text(
        (band[0] + padding - text_left, band[1] + padding - top), text, fill=_text_color(color), font=font
    )


def _caption_text(index: int, result: Mapping, show_index: bool) -> str:
    text = str(result.get("caption", ""))
    if result.get("label"):
        text = f"{text} [{result['label']['name']}]"
    return f"{index}: {text}" if show_index else text


def _outline(draw: ImageDraw.ImageDraw, box: Rect, color, line_width: int) -> None:
    """The box in ``color`` between two thin lines of its text colour (black or white), so that it shows on
    any background, dark or light, even one of its own colour."""
    x1, y1, x2, y2 = box
    # Boxes are exclusive at x2/y2; PIL's rectangle includes both corners.
    draw.rectangle(
        (x1 - 1, y1 - 1, max(x1, x2 - 1) + 1, max(y1, y2 - 1) + 1),
        outline=_text_color(color),
        width=line_width + 2,
    )
    draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=color, width=line_width)


def _mark_band(draw: ImageDraw.ImageDraw, text: str, font, image_size: tuple[int, int]) -> Rect:
    """Where `_draw_mark` writes ``text``: the bottom-right corner."""
    width, height = image_size
    padding = max(1, round(font.size * 0.25))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return (width - (right - left) - 2 * padding, height - (bottom - top) - 2 * padding, width, height)


def _draw_mark(draw: ImageDraw.ImageDraw, text: str, font, band: Rect) -> None:
    """``text`` in small black letters on white in ``band``."""
    padding = max(1, round(font.size * 0.25))
    left, top, _, _ = draw.textbbox((0, 0), text, font=font)
    draw.rectangle((band[0], band[1], band[2] - 1, band[3] - 1), fill="white")
    draw.text((band[0] + padding - left, band[1] + padding - top), text, fill="black", font=font)


def label_sizes(image_size: tuple[int, int]) -> tuple[int, int]:
    """(line width, font size) of `draw_regions` for an image of ``image_size``: they grow with the image's
    longer side, so that a 512-pixel image gets 14-pixel letters, a 4000-pixel photo 100-pixel ones."""
    longer_side = max(image_size)
    return max(2, round(longer_side / 250)), max(14, round(longer_side / 40))


def draw_regions(
    image: PIL.Image.Image,
    results: Sequence[Mapping],
    *,
    line_width: int | None = None,
    font_size: int | None = None,
    show_index: bool = True,
    legend: bool = False,
    mark: str | None = None,
) -> PIL.Image.Image:
    """A copy of ``image`` with every region's box outlined and its caption written on it.

    Args:
        image: the picture the regions belong to.
        results: region records with a ``"box"`` ``[x1, y1, x2, y2]`` in pixels and a ``"caption"``
            (as returned by the ``region-captioning`` pipeline); ``"label"`` is added when present.
        line_width, font_size: default to sizes that scale with the image (`label_sizes`).
        show_index: prefix each caption with the region's index (``"0: a dog"``).
        legend: write only the index on each box and the captions in a legend under the image, one
            line per region (for small images or many regions, where captions would hide the picture).
        mark: a note written small in the bottom-right corner of the picture (the `dynrefer` command marks
            pictures made with the demonstration model so).

    Returns:
        A new RGB image; region ``i`` is drawn in ``region_color(i)`` edged in black or white (whichever
        contrasts with that colour), its caption (or index) in black or white on a filled band of that
        colour above the box, or inside its top edge or below it, where the band crosses no other box and
        no other band (shortened with an ellipsis where the whole caption fits nowhere). With ``legend``
        the picture is taller by the legend.
    """
    canvas = image.convert("RGB")  # always a copy
    default_line_width, default_font_size = label_sizes(canvas.size)
    line_width = line_width or default_line_width
    font = _font(font_size or default_font_size)
    draw = ImageDraw.Draw(canvas)
    boxes = [tuple(round(float(value)) for value in result["box"]) for result in results]
    for index, box in enumerate(boxes):
        _outline(draw, box, region_color(index), line_width)
    # Captions after all boxes, so that no outline crosses a caption; none over the mark.
    taken: list[Rect] = []
    if mark:
        mark_font = _font(max(10, round(font.size * 0.7)))
        taken.append(_mark_band(draw, mark, mark_font, canvas.size))
    for index, (box, result) in enumerate(zip(boxes, results)):
        text = str(index) if legend else _caption_text(index, result, show_index)
        others = boxes[:index] + boxes[index + 1 :]
        _label(draw, box, text, region_color(index), font, canvas.size, others, taken, line_width, str(index))
    if mark:
        _draw_mark(draw, mark, mark_font, taken[0])
    if not legend:
        return canvas
    line_height = round(font.size * 1.6)
    picture = PIL.Image.new("RGB", (canvas.width, canvas.height + line_height * len(results) + 4), "white")
    picture.paste(canvas, (0, 0))
    draw = ImageDraw.Draw(picture)
    swatch = round(font.size * 0.9)
    for index, result in enumerate(results):
        top = canvas.height + 2 + index * line_height
        # A swatch of the region's colour, then the caption in black.
        draw.rectangle((4, top + 1, 4 + swatch - 1, top + swatch), fill=region_color(index))
        text = _fit_text(draw, _caption_text(index, result, True), font, canvas.width - swatch - 12)
        draw.text((swatch + 8, top), text, fill="black", font=font)
    return picture


def draw_clicks(
    image: PIL.Image.Image,
    masks: Sequence[np.ndarray | None],
    points: Sequence[Sequence[Sequence[float]]],
    point_labels: Sequence[Sequence[int]] | None = None,
) -> PIL.Image.Image:
    """A copy of ``image`` with every region's mask tinted and outlined and its clicks marked.

    Region ``i`` is drawn in ``region_color(i)``, as ``draw_regions`` draws its box, so that
    ``draw_regions(draw_clicks(image, masks, points), results)`` shows clicks, masks and captions together.

    Args:
        masks: a boolean mask [H, W] per region (the segmenter's, or the pipeline's ``"mask"`` decoded), or
            ``None`` for a region without one (a box), which is left to ``draw_regions``.
        points: the clicks of each region, ``[[[x, y], ...], ...]`` in pixels (``[]`` for none).
        point_labels: 1 (on the object, a filled dot) or 0 (not on it, a cross) per click; default all 1.
    """
    canvas = image.convert("RGB")
    line_width = max(2, round(min(canvas.size) / 200))
    radius = max(4, round(min(canvas.size) / 80))
    for index, mask in enumerate(masks):
        if mask is None:  # a region given as a box
            continue
        color = region_color(index)
        inside = PIL.Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255)
        # The outline: the mask minus the mask shrunk by the line width.
        shrunk = inside.filter(ImageFilter.MinFilter(2 * line_width + 1))
        outline = PIL.Image.fromarray(np.asarray(inside) & ~np.asarray(shrunk))
        canvas.paste(PIL.Image.blend(canvas, PIL.Image.new("RGB", canvas.size, color), 0.35), mask=inside)
        canvas.paste(color, mask=outline)
    draw = ImageDraw.Draw(canvas)
    for index, region in enumerate(points):
        labels = [1] * len(region) if point_labels is None else point_labels[index]
        for (x, y), label in zip(region, labels):
            corners = (x - radius, y - radius, x + radius, y + radius)
            if label:
                draw.ellipse(corners, fill=region_color(index), outline="white", width=max(1, radius // 3))
            else:
                draw.line(corners, fill="white", width=max(2, radius // 2))
                draw.line((x - radius, y + radius, x + radius, y - radius), fill="white", width=max(2, radius // 2))
    return canvas


def draw_views(
    image: PIL.Image.Image,
    crop_boxes,
    view_boxes,
    view_ratios=None,
    *,
    view_size: int | tuple[int, int] = 224,
    tile_size: int = 192,
    captions: Sequence[str] | None = None,
) -> PIL.Image.Image:
    """The nested views of every region side by side, one row per region, the target box marked.

    Each tile shows what the model was given for one view: the crop of ``image`` at ``crop_boxes``
    resized to a square (as the image processor does, aspect ratio not kept), with the region's box
    inside it drawn from ``view_boxes``.

    Args:
        image: the original picture.
        crop_boxes: [R, V, 4] integer crops in the original image (the image processor's ``crop_boxes``).
        view_boxes: [R, V, 4] the target box in each view's ``view_size`` x ``view_size`` pixels
            (the image processor's ``view_boxes``).
        view_ratios: [R, V] the interpolation coefficient t of each view, written under its tile.
        view_size: size of the processor's views, a side or (height, width) (224 for the released model).
        tile_size: side of each tile in the picture.
        captions: optional text per region, written at the start of its row.

    Returns:
        An RGB image of ``R`` rows and ``V`` tiles per row.
    """
    crop_boxes = np.asarray(crop_boxes, dtype=np.float64)
    view_boxes = np.asarray(view_boxes, dtype=np.float64)
    if crop_boxes.ndim != 3 or crop_boxes.shape[-1] != 4 or view_boxes.shape != crop_boxes.shape:
        raise ValueError(
            f"crop_boxes and view_boxes must both be [R, V, 4], got {list(crop_boxes.shape)} and {list(view_boxes.shape)}"
        )
    num_regions, num_views = crop_boxes.shape[:2]
    if view_ratios is not None:
        view_ratios = np.asarray(view_ratios, dtype=np.float64)
        if view_ratios.shape != (num_regions, num_views):
            raise ValueError(
                f"view_ratios must be [{num_regions}, {num_views}], got {list(view_ratios.shape)}"
            )
    if captions is not None and len(captions) != num_regions:
        raise ValueError(f"{len(captions)} captions for {num_regions} regions")

    source = image.convert("RGB")
    font = _font(max(11, tile_size // 14))
    margin = max(4, tile_size // 24)
    text_height = round(font.size * 1.5)
    row_height = text_height + tile_size + text_height + margin
    picture = PIL.Image.new(
        "RGB", (margin + num_views * (tile_size + margin), margin + num_regions * row_height), "white"
    )
    draw = ImageDraw.Draw(picture)
    view_height, view_width = (view_size, view_size) if isinstance(view_size, int) else view_size
    scale = np.array([tile_size / view_width, tile_size / view_height] * 2)
    for region in range(num_regions):
        color = region_color(region)
        top = margin + region * row_height
        heading = f"region {region}" + (f": {captions[region]}" if captions is not None else "")
        draw.text(
            (margin, top), _fit_text(draw, heading, font, picture.width - 2 * margin), fill=color, font=font
        )
        for view in range(num_views):
            left = margin + view * (tile_size + margin)
            tile_top = top + text_height
            x1, y1, x2, y2 = (int(value) for value in crop_boxes[region, view])
            tile = source.crop((x1, y1, x2, y2)).resize((tile_size, tile_size), PIL.Image.Resampling.BICUBIC)
            picture.paste(tile, (left, tile_top))
            bx1, by1, bx2, by2 = view_boxes[region, view] * scale
            draw.rectangle(
                (left + bx1, tile_top + by1, left + max(bx1, bx2 - 1), tile_top + max(by1, by2 - 1)),
                outline=color,
                width=max(2, tile_size // 64),
            )
            if view_ratios is not None:
                draw.text(
                    (left, tile_top + tile_size + 2),
                    f"t = {view_ratios[region, view]:.1f}",
                    fill="black",
                    font=font,
                )
    return picture
