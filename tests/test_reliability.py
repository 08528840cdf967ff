"""Hardening (docs/reliability.md): every bad input gets a clear answer before any work, broken model folders
are named, images are read safely, and save/load paths round-trip."""

import argparse
import io
import json
import logging
import shutil
import socket
import struct
import subprocess
import sys
import threading
import zlib

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import make_tiny_config, make_varied_tiny_model
from transformers import pipeline

from dynrefer_hf import DynReferConfig, DynReferForRegionCaptioning, DynReferImageProcessor
from dynrefer_hf.cli import attach_negative_values, main
from dynrefer_hf.cli.common import parse_box
from dynrefer_hf.images import load_rgb_image
from dynrefer_hf.pipelines.region_captioning import DEMO_MODEL_NOTICE
from dynrefer_hf.validation import (
    binary_masks,
    check_bool,
    check_count,
    check_model_folder,
    check_number,
    check_probability,
    check_top_k,
    checked_region_box,
)

BOX = [10, 10, 40, 40]

# ------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def describe(tiny_region_captioner):
    return pipeline("region-captioning", model=str(tiny_region_captioner), device="cpu")


@pytest.fixture(scope="module")
def image():
    return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))


@pytest.fixture
def no_forward(describe, monkeypatch):
    """The pipeline with a model that must not run: every refusal happens before any region is run."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the model ran although the input was refused")

    monkeypatch.setattr(describe.model, "generate", forbidden)
    monkeypatch.setattr(describe.model, "label_regions", forbidden)
    return describe


# ------------------------------------------------------------------------------------------ validation


def test_validation_helpers_name_argument_value_and_what_is_allowed():
    assert check_count("n", 3) == 3 and check_top_k("k", None) is None and check_top_k("k", 0) == 0
    assert check_probability("p", 1) == 1.0 and check_bool("b", np.bool_(True)) is True
    for call, error, message in (
        (lambda: check_count("batch_size", 0), ValueError, "batch_size must be an integer >= 1, got 0"),
        (lambda: check_count("batch_size", True), TypeError, "got True (bool)"),
        (lambda: check_count("batch_size", 2.0), TypeError, "got 2.0 (float)"),
        (lambda: check_probability("tag_threshold", float("nan")), ValueError, "in [0, 1], got nan"),
        (lambda: check_probability("tag_threshold", "0.5"), TypeError, "got '0.5' (str)"),
        (lambda: check_number("timeout", 0, 0.0, low_open=True), ValueError, "in (0, inf], got 0"),
        (lambda: check_top_k("attribute_top_k", -1), ValueError, ">= 0 or None (all), got -1"),
        (lambda: check_bool("return_views", "yes"), TypeError, "must be True or False, got 'yes'"),
    ):
        with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            call()


def test_masks_must_be_binary():
    assert binary_masks(np.array([[0, 1]], dtype=np.uint8)).dtype == bool
    assert binary_masks(torch.tensor([[0.0, 1.0]])).tolist() == [[False, True]]
    with pytest.raises(ValueError, match=r"values from 0 to 0\.3.*masks > 0\.5"):
        binary_masks(np.array([[0.0, 0.3]]))
    with pytest.raises(ValueError, match="NaN"):
        binary_masks(np.array([[np.nan, 1.0]]))
    with pytest.raises(TypeError, match="dtype <U1"):
        binary_masks(np.array([["a"]]))


def test_integer_masks_of_zero_and_one_other_value_are_binary():
    masks = np.zeros((2, 6, 8), dtype=np.uint8)
    masks[0, 1:4, 2:5] = 255  # as SAM masks and mask PNGs are saved
    masks[1, 2:5, 3:7] = 255
    expected = masks.astype(bool)  # non-zero is the region, as torchvision's masks_to_boxes reads masks
    np.testing.assert_array_equal(binary_masks(masks), expected)
    np.testing.assert_array_equal(binary_masks(torch.from_numpy(masks.astype(np.int32) // 255 * 7)), expected)
    np.testing.assert_array_equal(binary_masks(np.zeros((1, 3, 3), dtype=np.int64)), np.zeros((1, 3, 3), bool))
    for refused in (
        np.array([[0, 1, 2]], dtype=np.uint8),  # a label map, not one region
        np.array([[0, -1, -1]], dtype=np.int16),
        np.array([[0.0, 255.0]]),  # soft or not, floats stay 0/1
    ):
        with pytest.raises(ValueError, match="0 and one other positive integer such as 0/255"):
            binary_masks(refused)


def test_one_box_rule_for_processor_pipeline_and_command_line():
    assert checked_region_box([-5, 3, 20, 40], 80, 60).tolist() == [-5, 3, 20, 40]  # partly outside: kept
    assert checked_region_box([30, 30, 30, 30], 80, 60).tolist() == [29, 29, 30, 30]  # zero area: widened
    for box, message in (
        ([90, 70, 100, 80], "covers no pixel of the 80x60 image"),
        ([30, 5, 10, 40], "need x1 <= x2"),
        ([np.inf, 5, 10, 40], "finite"),
    ):
        with pytest.raises(ValueError, match=message):
            checked_region_box(box, 80, 60)
    assert parse_box("-5, 3,20,40") == [-5.0, 3.0, 20.0, 40.0]
    assert parse_box("30,30,30,30") == [30.0] * 4
    for text in ("1,2,3", "a,b,c,d", "nan,1,2,3", "5,1,2,3"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not a box"):
            parse_box(text)


# ------------------------------------------------------------------------------------------ pipeline


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"tag_threshold": 1.5}, ValueError, "tag_threshold must be a number in"),
        ({"tag_threshold": "0.5"}, TypeError, "tag_threshold"),
        ({"attribute_top_k": -1}, ValueError, "attribute_top_k must be an integer >= 0 or None"),
        ({"batch_size": 0}, ValueError, "batch_size must be an integer >= 1"),
        ({"batch_size": True}, TypeError, "batch_size"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens must be an integer >= 1"),
        ({"num_beams": 0}, ValueError, "num_beams must be an integer >= 1"),
        ({"num_return_sequences": 2}, ValueError, "num_return_sequences must be 1"),
        ({"no_such_option": 1}, TypeError, r"unknown parameter\(s\) \['no_such_option'\]"),
        ({"return_views": "yes"}, TypeError, "return_views must be True or False"),
        ({"progress_bar": "on"}, TypeError, "progress_bar must be True, False or None"),
        ({"timeout": -1}, ValueError, r"timeout must be a number in \(0, inf\]"),
        ({"exif_orientation": 1}, TypeError, "exif_orientation must be True or False"),
        ({"view_selection": "best"}, ValueError, "view_selection must be one of"),
        ({"view_selection": [2.0, 0.5]}, ValueError, r"every t must lie in \[0, 1\]"),
        ({"view_selection": "task", "task": "unknown"}, ValueError, "needs task in"),
        ({"generate_kwargs": [1]}, TypeError, "generate_kwargs must be a dict"),
        ({"boxes": [[1, 2, 3, 4], [1, 2, 3]]}, ValueError, r"boxes must be numbers shaped"),
        ({"boxes": []}, ValueError, "boxes is empty"),
        ({"boxes": [[70, 50, 60, 55]]}, ValueError, r"need x1 <= x2"),
        ({"boxes": [[100, 70, 120, 80]]}, ValueError, "covers no pixel of the 80x60 image"),
        ({"boxes": None, "masks": np.full((1, 60, 80), 0.3)}, ValueError, "masks must be binary"),
        ({"boxes": None, "masks": np.full((1, 60, 80), np.nan)}, ValueError, "NaN"),
        ({"controls": 5}, TypeError, "controls must be a comma-separated string"),
        ({"controls": [[1]]}, TypeError, "the controls of a region must be"),
    ],
)
def test_pipeline_refuses_bad_arguments_before_any_work(no_forward, image, kwargs, error, message):
    with pytest.raises(error, match=message):
        no_forward(image, **{"boxes": [BOX], **kwargs})


@pytest.mark.parametrize(
    ("images", "error", "message"),
    [
        ([], ValueError, "images is empty"),
        (None, TypeError, "images must be an image"),
        (5, TypeError, "images must be an image"),
        (np.zeros((60, 80, 3), np.float32), ValueError, "dtype float32"),
        (PIL.Image.new("F", (80, 60)), ValueError, "mode 'F'"),
        (np.zeros((0, 80, 3), np.uint8), ValueError, "the image is empty"),
    ],
)
def test_pipeline_refuses_bad_images(no_forward, images, error, message):
    with pytest.raises(error, match=message):
        no_forward(images) if images is None or isinstance(images, int) else no_forward(images, boxes=[BOX])


def test_valid_borderline_regions_are_described(describe, image):
    results = describe(
        image, boxes=[[-20, -5, 60, 300], [30, 30, 30, 30]], attribute_top_k=0, max_new_tokens=2
    )
    assert [result["box"] for result in results] == [[-20, -5, 60, 300], [30, 30, 30, 30]]
    assert all(result["attributes"] == [] for result in results)
    masks = np.zeros((1, 60, 80), dtype=np.uint8)
    masks[0, 10:20, 5:30] = 1
    assert describe(image, masks=masks, max_new_tokens=2)[0]["box"] == [5, 10, 29, 19]


# ------------------------------------------------------------------------------------------ image files


def _bomb_png(path, side=20000):
    """A small PNG whose header claims side x side pixels (more than twice PIL's pixel limit)."""
    buffer = io.BytesIO()
    PIL.Image.new("L", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    header = b"IHDR" + struct.pack(">II", side, side) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    path.write_bytes(bytes(data))
    return path


def test_unreadable_images_get_one_clear_error(tmp_path):
    (tmp_path / "text.jpg").write_text("hello")
    cases = {
        str(tmp_path / "text.jpg"): "is not a readable image",
        str(_bomb_png(tmp_path / "bomb.png")): "decompression bomb",
        str(tmp_path): "is a folder, not an image file",
    }
    for source, message in cases.items():
        with pytest.raises(ValueError, match=message):
            load_rgb_image(source)
    with pytest.raises(FileNotFoundError, match="image file not found"):
        load_rgb_image(tmp_path / "missing.png")


def test_download_that_never_answers_times_out():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    try:
        with pytest.raises(ValueError, match=r"could not download the image .* \(timeout 0.5 s\)"):
            load_rgb_image(f"http://127.0.0.1:{server.getsockname()[1]}/x.jpg", timeout=0.5)
    finally:
        server.close()


def test_16_bit_images_are_rescaled_not_clipped(tmp_path):
    grey = np.arange(60 * 80, dtype=np.uint32).reshape(60, 80) % 256
    wide = (grey * 257).astype(np.uint16)  # 8-bit v is 16-bit v * 257
    PIL.Image.fromarray(wide).save(tmp_path / "wide.png")
    expected = np.repeat(grey.astype(np.uint8)[:, :, None], 3, axis=2)
    for source in (tmp_path / "wide.png", PIL.Image.fromarray(wide), wide):
        assert np.array_equal(np.asarray(load_rgb_image(source)), expected)


def test_the_processor_reads_16_bit_pictures_by_the_pipeline_rule(tmp_path):
    # one image rule (dynrefer_hf.images): the processor's views of a 16-bit picture are those of the
    # pipeline's 8-bit RGB reading of the same file, not of a clipped convert("RGB")
    wide = np.random.default_rng(0).integers(0, 65536, (60, 80), dtype=np.uint16)
    PIL.Image.fromarray(wide).save(tmp_path / "wide.png")
    processor = DynReferImageProcessor(size={"height": 32, "width": 32})
    box = [[5, 5, 50, 40]]
    with PIL.Image.open(tmp_path / "wide.png") as sixteen_bit:
        assert sixteen_bit.mode == "I;16"
        views = processor(sixteen_bit, boxes=box)["pixel_values"]
    expected = processor(load_rgb_image(tmp_path / "wide.png"), boxes=box)["pixel_values"]
    clipped = processor(PIL.Image.fromarray(wide).convert("RGB"), boxes=box)["pixel_values"]
    assert torch.equal(views, expected) and not torch.equal(views, clipped)


def test_exif_orientation_is_respected_unless_told_otherwise(describe, tmp_path):
    stored = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 100, 3), dtype=np.uint8))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    stored.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    shown = load_rgb_image(tmp_path / "rotated.jpg")
    assert shown.size == (40, 100)
    assert load_rgb_image(tmp_path / "rotated.jpg", exif_orientation=False).size == (100, 40)
    tall_box = [[5, 60, 30, 90]]  # inside the displayed 40x100 image, below the stored 100x40 one
    assert len(describe(str(tmp_path / "rotated.jpg"), boxes=tall_box, max_new_tokens=2)) == 1
    with pytest.raises(ValueError, match="covers no pixel of the 100x40 image"):
        describe(str(tmp_path / "rotated.jpg"), boxes=tall_box, exif_orientation=False)


# ------------------------------------------------------------------------------------------ models


def _broken(folder, tmp_path, name, damage):
    target = tmp_path / name
    shutil.copytree(folder, target)
    damage(target)
    return target


def _drop_tag_fc(folder):
    weights = load_file(folder / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if not k.startswith("tag_fc")},
        folder / "model.safetensors",
        metadata={"format": "pt"},
    )


BROKEN_FOLDERS = {
    "empty": (
        lambda f: [p.unlink() for p in f.iterdir()],
        FileNotFoundError,
        r"has no config.json \(it is empty\)",
    ),
    "corrupt_weights": (
        lambda f: (f / "model.safetensors").write_bytes(b"\0" * 64),
        ValueError,
        "model.safetensors is corrupt or truncated",
    ),
    "truncated_weights": (
        lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:-100]),
        ValueError,
        "model.safetensors is (corrupt or )?truncated",
    ),
    "no_weights": (
        lambda f: (f / "model.safetensors").unlink(),
        FileNotFoundError,
        "has a config.json but no weights",
    ),
    "config_not_json": (
        lambda f: (f / "config.json").write_text("{ no"),
        ValueError,
        "is not a readable JSON file",
    ),
    "config_of_bert": (
        lambda f: (f / "config.json").write_text('{"model_type": "bert"}'),
        ValueError,
        "is a 'bert' model, not a 'dynrefer' model",
    ),
    "config_incomplete": (
        lambda f: (f / "config.json").write_text('{"model_type": "dynrefer"}'),
        ValueError,
        r"do not fit its config.json \(\d+ tensor\(s\) of other shapes",
    ),
}


@pytest.mark.parametrize("name", sorted(BROKEN_FOLDERS))
def test_broken_model_folder_is_named_by_from_pretrained_and_the_command(
    name, tiny_region_captioner, tmp_path, capsys
):
    damage, error, message = BROKEN_FOLDERS[name]
    folder = _broken(tiny_region_captioner, tmp_path, name, damage)
    with pytest.raises(error, match=message):
        DynReferForRegionCaptioning.from_pretrained(folder)
    picture = tmp_path / "image.png"
    PIL.Image.new("RGB", (80, 60)).save(picture)
    assert (
        main(["caption", str(picture), "--box", "1,2,30,40", "--model", str(folder), "--device", "cpu"]) == 2
    )
    err = [line for line in capsys.readouterr().err.splitlines() if line and "Loading weights" not in line]
    assert len(err) == 1 and "Traceback" not in err[0], err  # one line (beside a progress bar)
    assert err[0].startswith("dynrefer caption: ") and str(folder) in err[0]


def test_dynrefer_config_refuses_another_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    with pytest.raises(ValueError, match="model_type 'bert', not 'dynrefer'"):
        DynReferConfig.from_pretrained(tmp_path)
    for field, value in (("tag_threshold", 2.0), ("head_dropout", -0.1), ("max_text_length", 0)):
        with pytest.raises(ValueError, match=field):
            make_tiny_config(**{field: value})


@pytest.mark.slow
def test_checkpoint_missing_trained_tensors_is_refused_unless_allowed(
    tiny_region_captioner, tmp_path, capsys
):
    folder = _broken(tiny_region_captioner, tmp_path, "missing", _drop_tag_fc)
    assert DynReferForRegionCaptioning.from_pretrained(folder).missing_weights == [
        "tag_fc.bias",
        "tag_fc.weight",
    ]
    with pytest.raises(
        ValueError, match=r"lacks 2 of the model's tensors.*tag_fc.bias, tag_fc.weight.*allow_missing_weights"
    ):
        pipeline("region-captioning", model=str(folder), device="cpu")
    allowed = pipeline("region-captioning", model=str(folder), device="cpu", allow_missing_weights=True)
    picture = tmp_path / "image.png"
    PIL.Image.new("RGB", (80, 60)).save(picture)
    assert len(allowed(str(picture), boxes=[BOX], max_new_tokens=2)) == 1
    arguments = ["caption", str(picture), "--box", "1,2,30,40", "--model", str(folder), "--device", "cpu"]
    assert main(arguments) == 2
    assert "tag_fc.bias, tag_fc.weight; pass --allow-missing-weights" in capsys.readouterr().err
    assert main([*arguments, "--allow-missing-weights", "--max-new-tokens", "2"]) == 0


def test_generate_pads_finished_beams_with_the_pad_id():
    model = make_varied_tiny_model(0)
    torch.manual_seed(0)
    pixel_values = torch.randn(6, 3, 3, 56, 56)
    view_boxes = torch.tensor([[[0.0, 0.0, 56.0, 56.0]] * 3] * 6)
    sequences = model.generate(pixel_values, view_boxes, num_beams=2, max_new_tokens=12).sequences
    pad, eos = model.generation_config.pad_token_id, model.generation_config.eos_token_id
    finished_early = 0
    for row in sequences[:, 1:].tolist():  # after the decoder start token
        if eos in row:
            after = row[row.index(eos) + 1 :]
            assert after == [pad] * len(
                after
            )  # transformers 5 would repeat the EOS (pad id 0 taken for missing)
            finished_early += bool(after)
    assert finished_early  # the property was exercised


@pytest.mark.slow
def test_float64_model_keeps_float64_outputs():
    model = make_varied_tiny_model(0).double()
    pixel_values = torch.randn(2, 3, 3, 56, 56, dtype=torch.float64)
    view_boxes = torch.tensor([[[0.0, 0.0, 56.0, 56.0]] * 3] * 2, dtype=torch.float64)
    output = model(pixel_values, view_boxes)
    assert output.tag_logits.dtype == torch.float64 and output.region_queries.dtype == torch.float64
    logits, mask, attributes, classes = model.predict_labels(output.region_queries)
    assert {logits.dtype, attributes.dtype, classes.dtype} == {torch.float64} and mask.dtype == torch.bool


@pytest.mark.slow
def test_pipeline_save_pretrained_and_push_to_hub_round_trip(describe, image, tmp_path, monkeypatch):
    expected = describe(image, boxes=[BOX, [20, 5, 70, 50]], max_new_tokens=3)
    describe.save_pretrained(tmp_path / "saved")
    assert "custom_pipelines" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    reloaded = pipeline("region-captioning", model=str(tmp_path / "saved"), device="cpu")
    assert reloaded(image, boxes=[BOX, [20, 5, 70, 50]], max_new_tokens=3) == expected
    with pytest.raises(ValueError, match="is a file"):
        describe.save_pretrained(tmp_path / "saved" / "config.json")

    uploaded = tmp_path / "hub"

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

    def upload(self, working_dir, repo_id, files_timestamps, **kwargs):
        shutil.copytree(working_dir, uploaded)

    monkeypatch.setattr("transformers.utils.hub.hf_api", lambda: FakeApi())
    monkeypatch.setattr(type(describe), "_upload_modified_files", upload)
    describe.push_to_hub("someone/tiny-dynrefer")
    again = pipeline("region-captioning", model=str(uploaded), device="cpu")
    assert again(image, boxes=[BOX, [20, 5, 70, 50]], max_new_tokens=3) == expected


# ------------------------------------------------------------------------------------------ command line


def test_negative_box_values_reach_the_box_option():
    assert attach_negative_values(["caption", "a.png", "--box", "-5,3,20,40", "--box", "1,2,3,4"]) == [
        "caption", "a.png", "--box=-5,3,20,40", "--box", "1,2,3,4",
    ]  # fmt: skip
    assert attach_negative_values(["--", "--box", "-5,3,20,40"]) == ["--", "--box", "-5,3,20,40"]


def test_command_boxes_partly_outside_or_negative_are_described_as_by_the_pipeline(
    tiny_region_captioner, describe, image, tmp_path, capsys
):
    picture = tmp_path / "image.png"
    image.save(picture)
    common = ["caption", str(picture), "--model", str(tiny_region_captioner), "--device", "cpu", "--json"]
    common += ["--max-new-tokens", "3"]
    assert main([*common, "--box", "-5,3,20,40", "--box=30,30,30,30", "--box", "50,40,200,300"]) == 0
    regions = json.loads(capsys.readouterr().out)["regions"]
    expected = describe(
        image,
        boxes=[[-5, 3, 20, 40], [30, 30, 30, 30], [50, 40, 200, 300]],
        attribute_top_k=3,
        max_new_tokens=3,
    )
    assert [region["caption"] for region in regions] == [region["caption"] for region in expected]


def test_internal_error_shows_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("something internal")

    monkeypatch.setattr("dynrefer_hf.cli.scene.run", broken)
    assert main(["scene", "x.png"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: something internal" in err
    assert err.strip().splitlines()[-1].startswith("dynrefer scene: an internal error") and "report" in err


def test_demonstration_model_notice(caplog, capsys):
    assert main(["info", "--json"]) == 0
    err = capsys.readouterr().err
    assert err.count(DEMO_MODEL_NOTICE) == 1 and "docs/converting.md" in err and "--quiet" in err
    assert main(["info", "--json", "--quiet"]) == 0
    assert DEMO_MODEL_NOTICE not in capsys.readouterr().err
    with caplog.at_level(logging.WARNING, logger="dynrefer_hf.pipelines.region_captioning"):
        pipeline("region-captioning", device="cpu")
    assert caplog.messages.count(DEMO_MODEL_NOTICE) == 1


def test_help_and_argument_errors_do_not_import_torch():
    """`dynrefer --help` answers without torch or transformers (about 1 s instead of about 10 s)."""
    for arguments in (["--help"], ["caption", "x.png", "--box", "1,2"]):
        completed = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "dynrefer_hf.cli", *arguments],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert completed.returncode == (0 if arguments == ["--help"] else 2)
        imported = {line.split("|")[-1].strip() for line in completed.stderr.splitlines() if "|" in line}
        assert "torch" not in imported and "transformers" not in imported


def test_check_model_folder_accepts_a_saved_model_and_hub_ids(tiny_region_captioner):
    check_model_folder(tiny_region_captioner)
    check_model_folder("callsys/dynrefer")  # not a local folder: nothing to check here
