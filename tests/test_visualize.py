"""Pictures: ``draw_regions`` and ``draw_views`` on synthetic images whose expected pixels are known."""

import numpy as np
import PIL.Image
import pytest

from dynrefer_hf.visualize import draw_regions, draw_views, region_color

RED, BLUE = (255, 0, 0), (0, 0, 255)


def two_halves(width=200, height=100):
    """Left half red, right half blue."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, : width // 2] = RED
    array[:, width // 2 :] = BLUE
    return PIL.Image.fromarray(array)


def count(picture, colour):
    return int((np.asarray(picture) == colour).all(axis=2).sum())


def test_views_show_each_crop_with_the_target_box():
    image = two_halves()
    tile = 96
    # One region inside the red half, seen tightly (t = 0) and as the whole image (t = 1).
    crop_boxes = [[[10, 10, 60, 90], [0, 0, 200, 100]]]
    view_boxes = [[[0, 0, 224, 224], [11.2, 22.4, 67.2, 201.6]]]
    picture = draw_views(
        image, crop_boxes, view_boxes, [[0.0, 1.0]], view_size=224, tile_size=tile, captions=["a"]
    )
    assert picture.width >= 2 * tile and picture.height >= tile
    # Tight view: red everywhere but its outline; whole image: half red, half blue, with the outline in the red.
    outline = count(picture, region_color(0))
    assert outline > 4 * tile  # two outlines (and the heading's text)
    assert count(picture, BLUE) == pytest.approx(tile * tile / 2, rel=0.03)
    assert count(picture, RED) + outline == pytest.approx(tile * tile * 1.5, rel=0.03)


def test_views_need_matching_shapes():
    with pytest.raises(ValueError, match=r"\[R, V, 4\]"):
        draw_views(two_halves(), [[[0, 0, 10, 10]]], [[[0, 0, 10, 10], [0, 0, 5, 5]]])
    with pytest.raises(ValueError, match="view_ratios"):
        draw_views(two_halves(), [[[0, 0, 10, 10]]], [[[0, 0, 224, 224]]], view_ratios=[[0.0, 0.5]])


def test_regions_get_outlines_and_captions_in_their_colour():
    image = PIL.Image.new("RGB", (320, 240), (128, 128, 128))
    results = [
        {"box": [0, 0, 100, 80], "caption": "a box at the top"},  # no room above: caption inside, at the top
        {"box": [150, 120, 300, 230], "caption": "another box", "label": {"name": "dog", "score": 0.5}},
    ]
    picture = draw_regions(image, results)
    assert picture is not image and image.getpixel((0, 0)) == (128, 128, 128)
    pixels = np.asarray(picture)
    for index, (x1, y1, x2, y2) in enumerate(result["box"] for result in results):
        colour = region_color(index)
        assert tuple(pixels[(y1 + y2) // 2, x1]) == colour and tuple(pixels[y2 - 1, (x1 + x2) // 2]) == colour
    assert tuple(pixels[5, 1]) == region_color(0)  # the first caption's band, inside its box
    # the second caption's band, above its box
    assert (pixels[100:118, 152] == region_color(1)).all(axis=1).sum() > 10
    assert tuple(pixels[200, 20]) == (128, 128, 128)  # outside every box and caption


def test_legend_lists_the_captions_under_the_image():
    image = PIL.Image.new("RGB", (320, 240), (128, 128, 128))
    results = [{"box": [20, 40, 100, 120], "caption": "one"}, {"box": [150, 120, 300, 230], "caption": "two"}]
    picture = draw_regions(image, results, legend=True)
    assert picture.width == 320 and picture.height > 240 + 2 * 11
    pixels = np.asarray(picture)
    assert tuple(pixels[80, 20]) == region_color(0) and tuple(pixels[175, 150]) == region_color(1)
    legend = pixels[240:]
    # Each caption line starts with a swatch of its region's colour, in region order.
    swatch_rows = [np.flatnonzero((legend == region_color(i)).all(axis=2).any(axis=1)) for i in range(2)]
    assert all(rows.size > 5 for rows in swatch_rows) and swatch_rows[0].max() < swatch_rows[1].min()
    assert ((legend == 0).all(axis=2)).any()  # black caption text
    # On the image only the indices: the band above box 0 is narrower than the band of its caption.
    with_captions = np.asarray(draw_regions(image, results))
    band_width = (pixels[33] == region_color(0)).all(axis=1).sum()
    assert 0 < band_width < (with_captions[33] == region_color(0)).all(axis=1).sum()


def _band_rows(pixels, colour, column):
    """The rows where ``column`` has ``colour``."""
    return np.flatnonzero((pixels[:, column] == colour).all(axis=1))


def test_captions_do_not_run_across_another_box():
    image = PIL.Image.new("RGB", (400, 200), (128, 128, 128))
    # above box 0 a long caption would run over box 1's left edge, which starts higher up
    results = [
        {"box": [10, 60, 100, 150], "caption": "a long caption that is wider than its box by far"},
        {"box": [120, 20, 200, 150], "caption": "b"},
    ]
    pixels = np.asarray(draw_regions(image, results))
    line_width = 2
    left_edge = pixels[50:150, 120 : 120 + line_width]  # (below box 1's own label, inside its top)
    assert (left_edge == region_color(1)).all(axis=2).all()  # box 1's outline is whole
    # and the caption is still there, whole, by its box
    below = (pixels[150:] == region_color(0)).all(axis=2)
    assert below.any(axis=0).nonzero()[0].max() > 250


def test_boxes_and_labels_show_on_a_background_of_their_own_colour():
    brown = region_color(5)
    image = PIL.Image.new("RGB", (300, 200), brown)
    results = [{"box": [0, 0, 1, 1], "caption": str(i)} for i in range(5)] + [
        {"box": [100, 80, 200, 160], "caption": "x"}
    ]
    pixels = np.asarray(draw_regions(image, results, show_index=False))
    edge = (255, 255, 255)  # white on dark colours, black on light ones
    line_width = 2
    for x in (99, 100 + line_width):  # just outside and just inside the brown outline
        assert tuple(pixels[120, x]) == edge
    assert tuple(pixels[120, 100]) == brown


def test_labels_grow_with_the_image():
    def band_height(size):
        image = PIL.Image.new("RGB", (size, size * 2 // 3), (128, 128, 128))
        box = [size // 4, size // 3, size // 2, size // 2]
        pixels = np.asarray(draw_regions(image, [{"box": box, "caption": "a"}]))
        return _band_rows(pixels[: box[1]], region_color(0), box[0] + 1).size  # the band above the box

    small, large = band_height(512), band_height(2048)
    assert small >= 18  # 14-pixel letters on a 512-pixel image
    assert large == pytest.approx(4 * small, rel=0.2)


def test_a_mark_in_the_bottom_right_corner():
    image = PIL.Image.new("RGB", (320, 240), (128, 128, 128))
    results = [{"box": [200, 150, 320, 240], "caption": "a box in the corner"}]
    plain = np.asarray(draw_regions(image, results))
    marked = np.asarray(draw_regions(image, results, mark="demonstration model"))
    assert (plain[-3:, -3:] != 255).any()
    corner = marked[-12:, -100:]
    assert (corner == 255).all(axis=2).mean() > 0.5 and (corner < 80).all(axis=2).any()  # black on white
    # the caption goes elsewhere than under the mark
    assert (marked == region_color(0)).all(axis=2).sum() > 0.8 * (plain == region_color(0)).all(axis=2).sum()
