"""The ``dynrefer caption`` and ``dynrefer info`` commands, with a saved tiny model (offline)."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
from transformers import AutoTokenizer, pipeline

from dynrefer_hf.cli import main
from dynrefer_hf.visualize import region_color

BOXES = ([20, 60, 200, 300], [330, 150, 600, 420])
BOX_ARGS = [arg for box in BOXES for arg in ("--box", ",".join(map(str, box)))]


def run_dynrefer(*args):
    """``dynrefer ARGS`` in a fresh interpreter, offline."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dynrefer_hf.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        env=environment,
        timeout=300,
    )


@pytest.fixture(scope="module")
def image_path(fixtures_dir):
    return str(fixtures_dir / "images" / "COCO_val2014_000000000042.jpg")


@pytest.fixture(scope="module")
def full_run(tiny_region_captioner, image_path, tmp_path_factory):
    """One subprocess run with every output: JSON, the region picture and the views picture."""
    out = tmp_path_factory.mktemp("cli")
    completed = run_dynrefer(
        "caption", image_path, *BOX_ARGS, "--model", str(tiny_region_captioner), "--controls", "dog,grass",
        "--json", "--draw", str(out / "regions.png"), "--show-views", str(out / "views.png"), "--device", "cpu",
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout), out


@pytest.mark.slow
def test_caption_json_describes_every_box_as_the_pipeline_does(full_run, tiny_region_captioner, image_path):
    payload, _ = full_run
    assert payload["image"] == image_path and payload["model"] == str(tiny_region_captioner)
    assert payload["demonstration_model"] is False
    regions = payload["regions"]
    assert [region["box"] for region in regions] == [[float(v) for v in box] for box in BOXES]
    describe = pipeline("region-captioning", model=str(tiny_region_captioner), device="cpu")
    expected = describe(image_path, boxes=list(BOXES), controls="dog,grass", attribute_top_k=3)
    for region, reference in zip(regions, expected, strict=True):
        assert set(region) == {"box", "caption", "score", "tags", "attributes", "label"}
        assert region["caption"] == reference["caption"]
        assert region["tags"] == reference["tags"]
        assert region["label"]["name"] == reference["label"]["name"]
        assert [a["name"] for a in region["attributes"]] == [a["name"] for a in reference["attributes"]]
        assert region["score"] == pytest.approx(reference["score"], rel=1e-3)


def test_results_and_pictures_of_the_demonstration_model_say_so(image_path, tmp_path, capsys):
    from dynrefer_hf.cli import main

    picture_path = tmp_path / "regions.png"
    argv = ["caption", image_path, "--box", "20,60,200,300", "--json", "--draw", str(picture_path), "--quiet"]
    assert main([*argv, "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["demonstration_model"] is True
    # a small black-on-white mark in the bottom-right corner, where the photo is not white
    corner = np.asarray(PIL.Image.open(picture_path).convert("RGB"))[-12:, -120:]
    original = np.asarray(PIL.Image.open(image_path).convert("RGB"))[-12:, -120:]
    assert (original == 255).all(axis=2).mean() < 0.1
    assert (corner == 255).all(axis=2).mean() > 0.5 and (corner < 60).all(axis=2).any()


def test_caption_help_says_what_each_score_is(capsys):
    from dynrefer_hf.cli import main

    with pytest.raises(SystemExit):
        main(["caption", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "probability as a whole token sequence" in text and "can be negative" in text
    assert "not a probability" in text and "demonstration_model" in text


@pytest.mark.slow
def test_region_picture_outlines_each_box_in_its_colour(full_run, image_path):
    _, out = full_run
    picture = np.asarray(PIL.Image.open(out / "regions.png").convert("RGB"))
    original = np.asarray(PIL.Image.open(image_path).convert("RGB"))
    assert picture.shape == original.shape
    may_change = np.zeros(original.shape[:2], dtype=bool)
    for index, (x1, y1, x2, y2) in enumerate(BOXES):
        colour = region_color(index)
        middle_x, middle_y = (x1 + x2) // 2, (y1 + y2) // 2
        for x, y in ((x1, middle_y), (x2 - 1, middle_y), (middle_x, y2 - 1)):  # left, right and bottom edges
            assert tuple(picture[y, x]) == colour
        # the caption band sits on the top edge or, where there is more room, under the box
        by_the_box = np.concatenate([picture[max(0, y1 - 40) : y1 - 1], picture[y2 + 1 : y2 + 40]])
        assert (by_the_box == colour).all(axis=2).sum() > 300
        assert np.array_equal(
            picture[middle_y, middle_x], original[middle_y, middle_x]
        )  # the inside is not painted
        may_change[y1 - 1 : y2 + 1, x1 - 1 : x2 + 1] = True  # with the edge around the outline
        may_change[max(0, y1 - 40) : y1, :] = True  # the caption band above the box (shifted left if long)
        may_change[y2 : y2 + 40, :] = True  # or under it
    changed = (picture != original).any(axis=2)
    assert changed.any() and not (changed & ~may_change).any()


@pytest.mark.slow
def test_views_picture_is_written(full_run):
    _, out = full_run
    views = PIL.Image.open(out / "views.png")
    assert views.format == "PNG" and views.width >= 3 * 192 and views.height >= 2 * 192  # 2 regions x 3 views


@pytest.mark.slow
def test_table_lists_every_region(tiny_region_captioner, image_path, capsys):
    assert (
        main(["caption", image_path, *BOX_ARGS, "--model", str(tiny_region_captioner), "--device", "cpu"])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(image_path) and str(tiny_region_captioner) in lines[0]
    header, rule, *rows = lines[1:]
    assert header.split() == ["#", "box", "caption", "score", "class", "tags", "attributes"]
    assert set(rule.replace(" ", "")) == {"-"}
    assert [row.split()[:2] for row in rows] == [
        [str(i), ",".join(map(str, box))] for i, box in enumerate(BOXES)
    ]


def test_info_counts_the_parameters_of_every_part(tiny_region_captioner, capsys):
    from dynrefer_hf import DynReferForRegionCaptioning

    assert main(["info", str(tiny_region_captioner), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    model = DynReferForRegionCaptioning.from_pretrained(str(tiny_region_captioner))
    expected = {}
    for name, parameter in model.named_parameters():
        counts = expected.setdefault(name.split(".")[0], [0, 0])
        counts[0] += parameter.numel()
        counts[1] += parameter.numel() if parameter.requires_grad else 0
    assert {
        part["part"]: [part["parameters"], part["trainable"]] for part in summary["parameters"]
    } == expected
    assert summary["vocabularies"] == {
        "tokenizer": len(AutoTokenizer.from_pretrained(str(tiny_region_captioner))),
        "tags": len(model.config.tag_names),
        "attributes": len(model.config.attribute_names),
        "attribute_prompts": len(model.config.attribute_prompts),
        "classes": len(model.config.class_names),
    }
    assert summary["num_views"] == model.config.num_views and summary["image_size"] == 56
    assert main(["info", str(tiny_region_captioner)]) == 0
    assert "total" in capsys.readouterr().out


def test_model_neither_local_nor_cached_says_how_to_get_weights(image_path, capsys):
    # HF_HUB_OFFLINE=1 (tests/conftest.py): nothing is downloaded, as on a machine without network.
    model = "dynrefer-tests/never-cached"
    assert main(["caption", image_path, "--box", "1,2,30,40", "--model", model]) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(
        f"dynrefer caption: model {model!r} is neither a local folder nor in the Hugging Face cache"
    )
    assert f"hf download {model}" in message and "--model" in message


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["caption", "IMAGE"], "no regions given"),
        (["caption", "no/such.jpg", "--box", "1,2,3,4"], "image file not found: no/such.jpg"),
        (["caption", "NOT_AN_IMAGE", "--box", "1,2,3,4"], "is not a readable image"),
        (["caption", "IMAGE", "--box", "700,500,800,600"], "the box covers no pixel of the 640x478 image"),
        (["info", "no/such/model"], "'no/such/model' is neither a local folder"),
        (["caption", "IMAGE", "--box", "1,2,30,40", "--draw", "no/such/folder/out.png"], "does not exist"),
        (["caption", "IMAGE", "--box", "1,2,30,40", "--show-views", "views.txt"], "image extension"),
    ],
)
def test_bad_input_exits_with_a_message(args, message, image_path, tmp_path, capsys):
    not_an_image = tmp_path / "text.jpg"
    not_an_image.write_text("hello")
    args = [{"IMAGE": image_path, "NOT_AN_IMAGE": str(not_an_image)}.get(arg, arg) for arg in args]
    assert main(args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--box", "1,2,3"], "expected four numbers"),
        (["--box", "5,5,1,9"], "need x1 <= x2 and y1 <= y2"),
        (["--box", "nan,5,10,9"], "must be finite numbers"),
        (["--box", "1,2,30,40", "--batch-size", "0"], "argument --batch-size: '0' is not an integer >= 1"),
        (["--box", "1,2,30,40", "--tag-threshold", "1.5"], "argument --tag-threshold: '1.5' is not a number in [0, 1]"),
        (["--box", "1,2,30,40", "--top-attributes", "-1"], "argument --top-attributes: '-1' is not an integer >= 0"),
        (["--box", "1,2,30,40", "--timeout", "0"], "argument --timeout: '0' is not a number in (0, inf]"),
    ],
)
def test_malformed_argument_is_a_usage_error(args, message, image_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["caption", image_path, *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_no_captions_gives_the_labels_of_the_full_run(full_run, tiny_region_captioner, image_path, capsys):
    payload, _ = full_run
    arguments = ["caption", image_path, *BOX_ARGS, "--model", str(tiny_region_captioner), "--device", "cpu"]
    assert main([*arguments, "--json", "--no-captions", "--controls", "dog,grass"]) == 0
    regions = json.loads(capsys.readouterr().out)["regions"]
    for region, full in zip(regions, payload["regions"], strict=True):
        assert set(region) == {"box", "tags", "attributes", "label"}
        assert region == {key: full[key] for key in region}
    assert main([*arguments, "--no-captions"]) == 0
    assert capsys.readouterr().out.splitlines()[3].split()[2:4] == ["-", "-"]  # no caption, no score
    assert main([*arguments, "--no-captions", "--max-new-tokens", "3"]) == 2
    assert "generate_captions=False" in capsys.readouterr().err
