"""Clicks to masks (dynrefer_hf.segmentation) and regions given as points in the region-captioning pipeline.

The segmenter is a tiny, randomly initialised SAM saved to a folder (``tiny.save_tiny_sam``): its masks
mean nothing, but they are the masks a SAM model returns for those points, which is what is checked.
"""

import json
import re
from contextlib import nullcontext

import numpy as np
import PIL.Image
import pytest
import torch
from pycocotools import mask as mask_utils
from transformers import SamModel, SamProcessor, pipeline

from dynrefer_hf.app import EXAMPLES
from dynrefer_hf.cli import main
from dynrefer_hf.segmentation import PointSegmenter, mask_to_rle, region_points
from dynrefer_hf.views import mask_to_box
from dynrefer_hf.visualize import draw_clicks, region_color

IMAGE_PATH = EXAMPLES[2][0]  # a 377x376 shapes scene
POINTS = [[100, 340], [200, 320], [190, 75]]


@pytest.fixture(scope="module")
def image():
    with PIL.Image.open(IMAGE_PATH) as opened:
        return opened.convert("RGB")


@pytest.fixture(scope="module")
def segmenter(tiny_sam):
    return PointSegmenter.from_pretrained(tiny_sam)


@pytest.fixture(scope="module")
def describe(tiny_region_captioner, tiny_sam):
    return pipeline("region-captioning", model=str(tiny_region_captioner), segmenter=str(tiny_sam))


def _sam_alone(folder, image, points, labels):
    """SAM run directly through transformers on one region: the best-IoU mask of the three."""
    model, processor = SamModel.from_pretrained(folder).eval(), SamProcessor.from_pretrained(folder)
    inputs = processor(images=image, input_points=[[points]], input_labels=[[labels]], return_tensors="pt")
    with torch.no_grad():
        outputs = model(
            pixel_values=inputs["pixel_values"],
            input_points=inputs["input_points"],
            input_labels=inputs["input_labels"],
        )
    masks = processor.post_process_masks(
        outputs.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"]
    )
    return masks[0][0, outputs.iou_scores[0, 0].argmax()].numpy()


def test_batched_regions_equal_sam_run_on_each_region_alone(segmenter, tiny_sam, image):
    # regions with one and with two points share a batch (the shorter is padded): each mask is the one
    # SAM gives for that region alone
    regions = region_points([POINTS[0], [POINTS[1], POINTS[2]]], [1, [1, 0]])
    masks = segmenter(image, regions)
    assert masks.shape == (2, image.height, image.width) and masks.dtype == bool
    np.testing.assert_array_equal(masks[0], _sam_alone(tiny_sam, image, [POINTS[0]], [1]))
    np.testing.assert_array_equal(masks[1], _sam_alone(tiny_sam, image, [POINTS[1], POINTS[2]], [1, 0]))


def test_a_negative_click_changes_the_mask(segmenter, image):
    positive = segmenter(image, region_points([[POINTS[1]]]))[0]
    with_negative = segmenter(image, region_points([[POINTS[1], POINTS[2]]], [[1, 0]]))[0]
    assert (positive != with_negative).sum() > 100


def test_points_give_one_record_per_point_described_as_their_masks(describe, image):
    results = describe(image, points=POINTS, return_masks=True)
    assert len(results) == len(POINTS)
    masks = np.stack([mask_utils.decode(result["mask"]).astype(bool) for result in results])
    for result, mask in zip(results, masks):
        assert result["box"] == [float(value) for value in mask_to_box(mask)]
    through_masks = describe(image, masks=masks, return_masks=True)
    assert through_masks == results


@pytest.mark.slow
def test_points_for_a_list_of_images_follow_the_images(describe, image):
    flipped = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
    both = describe([image, flipped], points=[POINTS[:1], [POINTS[1], POINTS[2]]], point_labels=[[1], [1, 1]])
    assert both == [describe(image, points=POINTS[:1]), describe(flipped, points=POINTS[1:])]


@pytest.mark.slow  # bfloat16 on CPU
def test_the_segmenter_runs_on_the_pipelines_device_and_dtype(tiny_region_captioner, tiny_sam, image):
    describe = pipeline(
        "region-captioning", model=str(tiny_region_captioner), segmenter=str(tiny_sam), dtype=torch.bfloat16
    )
    assert describe.segmenter.model.dtype == torch.bfloat16 and describe.segmenter.device == describe.device
    (result,) = describe(image, points=POINTS[:1], return_masks=True)
    mask = mask_utils.decode({**result["mask"], "counts": result["mask"]["counts"].encode()}).astype(bool)
    assert result["box"] == [float(value) for value in mask_to_box(mask)]


def test_mask_to_rle_round_trips_through_pycocotools():
    mask = np.zeros((5, 7), dtype=bool)
    mask[1:4, 2:6] = True
    rle = mask_to_rle(mask)
    assert rle["size"] == [5, 7] and isinstance(rle["counts"], str)
    np.testing.assert_array_equal(mask_utils.decode({**rle, "counts": rle["counts"].encode()}), mask)


@pytest.mark.parametrize(
    ("points", "labels", "message"),
    [
        ([[1, 2, 3]], None, r"points of region 0 must be \[x, y\] pixels or a list of them, got \[1, 2, 3\]"),
        ([], None, "points must be a non-empty list"),
        ([[1, 2], [3, 4]], [1], r"point_labels must hold one entry per region \(2\)"),
        ([[[1, 2], [3, 4]]], [[1]], r"point_labels of region 0 must give one label per point \(2\)"),
        ([[1, 2]], [2], "must be 1 \\(on the object\\) or 0 \\(not on it\\), got \\[2\\]"),
        ([[1, 2]], [0], "region 0 has no positive point"),
    ],
)
def test_region_points_names_the_bad_entry(points, labels, message):
    with pytest.raises(ValueError, match=message):
        region_points(points, labels)


def test_a_point_outside_the_image_is_refused(describe, image):
    with pytest.raises(ValueError, match=r"point \(377, 10\) of region 1 is outside the 377x376 image"):
        describe(image, points=[[10, 10], [377, 10]])


def test_an_empty_mask_from_the_segmenter_is_refused(tiny_sam, image):
    segmenter = PointSegmenter.from_pretrained(tiny_sam)
    with torch.no_grad():  # the mask decoder's hypernetworks now give logits of 0 everywhere: no pixel is in
        for mlp in segmenter.model.mask_decoder.output_hypernetworks_mlps:
            mlp.proj_out.weight.zero_()
            mlp.proj_out.bias.zero_()
    with pytest.raises(
        ValueError,
        match=r"found no object at the points of region 0 \(\[\[10.0, 10.0\]\]\): its mask is empty",
    ):
        segmenter(image, region_points([[10, 10]]))


def test_a_segmenter_that_is_not_sam_is_refused(tiny_region_captioner, tmp_path):
    with pytest.raises(
        ValueError, match="is a 'dynrefer' model; a segmenter must be one of transformers' 'sam' or 'sam2'"
    ):
        PointSegmenter.from_pretrained(tiny_region_captioner)
    with pytest.raises(ValueError, match="is not a model folder or Hub id that can be loaded"):
        PointSegmenter.from_pretrained(tmp_path)


def test_points_need_a_segmenter_and_one_kind_of_region(tiny_region_captioner, describe, image):
    without = pipeline("region-captioning", model=str(tiny_region_captioner))
    with pytest.raises(ValueError, match="points need a segmenter: pass segmenter="):
        without(image, points=POINTS)
    with pytest.raises(ValueError, match="give the regions as boxes, masks or points, only one of them"):
        describe(image, boxes=[[0, 0, 10, 10]], points=POINTS)
    with pytest.raises(
        ValueError, match="return_masks=True needs the regions of every image as masks= or points="
    ):
        describe(image, boxes=[[0, 0, 10, 10]], return_masks=True)


def test_draw_clicks_tints_and_outlines_each_mask_and_marks_its_clicks():
    image = PIL.Image.new("RGB", (200, 100), (200, 200, 200))
    masks = np.zeros((2, 100, 200), dtype=bool)
    masks[0, 20:60, 20:80] = True
    masks[1, 30:90, 120:190] = True
    drawn = np.asarray(
        draw_clicks(
            image, [masks[0], None, masks[1]], [[[50, 40]], [], [[150, 60], [180, 85]]], [[1], [], [1, 0]]
        )
    )
    color0, color1 = np.array(region_color(0)), np.array(region_color(2))  # region 1 is a box: no mask
    assert (drawn[20, 30:70] == color0).all() and (drawn[59, 30:70] == color0).all()  # outline on the edge
    tinted = 0.65 * 200 + 0.35 * color0
    assert np.abs(drawn[40, 70] - tinted).max() <= 1  # inside: tinted
    assert (drawn[5, 100] == 200).all()  # outside every mask: untouched
    assert (drawn[40, 50] == color0).all() and (drawn[60, 150] == color1).all()  # positive clicks: dots
    assert (drawn[85, 180] == 255).all()  # the negative click: a white cross


# ---------------------------------------------------------------------------------------- the command


@pytest.mark.slow
def test_caption_command_describes_clicks_and_draws_masks_and_clicks(
    tiny_region_captioner, tiny_sam, describe, image, tmp_path, capsys
):
    drawn = tmp_path / "clicks.png"
    arguments = ["caption", IMAGE_PATH, "--model", str(tiny_region_captioner), "--segmenter", str(tiny_sam)]
    arguments += ["--point", "100,340", "--point", "190,75", "--json", "--draw", str(drawn), "--quiet"]
    assert main(arguments) == 0
    regions = json.loads(capsys.readouterr().out)["regions"]
    expected = describe(image, points=[POINTS[0], POINTS[2]], return_masks=True, attribute_top_k=3)
    assert regions == expected
    picture = np.asarray(PIL.Image.open(drawn).convert("RGB"))
    for number, (x, y) in enumerate([POINTS[0], POINTS[2]]):  # each click is a dot of its region's colour
        assert tuple(picture[y, x]) == region_color(number)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--point", "10,10"], "--point needs --segmenter MODEL"),
        (
            ["--point", "10,10", "--box", "1,1,5,5", "--segmenter", "x"],
            "give the regions as --box or as --point",
        ),
        (
            ["--point", "377,10", "--segmenter", "x"],
            r"point \(377, 10\) of region 0 is outside the 377x376 image",
        ),
        (["--point", "10;10", "--segmenter", "x"], "'10;10' is not a point: write x,y"),
    ],
)
def test_caption_command_refuses_bad_clicks_in_one_line(arguments, message, capsys):
    with pytest.raises(SystemExit) if "not a point" in message else nullcontext():
        assert main(["caption", IMAGE_PATH, *arguments]) == 2
    assert re.search(message, capsys.readouterr().err.strip().splitlines()[-1])
