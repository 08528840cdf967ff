"""DynReferImageProcessor and DynReferProcessor: golden views, pixels, batching, bad input, prompts, labels."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from tiny import make_tiny_tokenizer
from transformers import AutoImageProcessor, AutoProcessor

from dynrefer_hf import DynReferConfig, DynReferImageProcessor, DynReferProcessor, views

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@pytest.fixture(scope="module")
def golden(fixtures_dir):
    return json.loads((fixtures_dir / "golden_views.json").read_text())


@pytest.fixture(scope="module")
def photo(fixtures_dir):
    return Image.open(fixtures_dir / "images" / "COCO_val2014_000000000192.jpg").convert("RGB")


@pytest.fixture(scope="module")
def small_image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def image_processor():
    return DynReferImageProcessor()


def _direct_pixels(image: Image.Image, crop_box) -> np.ndarray:
    """Upstream's pixel path written out: NumPy crop, PIL bicubic to 224, x * (1/255), CLIP mean/std, CHW."""
    x1, y1, x2, y2 = crop_box
    crop = Image.fromarray(np.asarray(image)[y1:y2, x1:x2])
    if crop.size != (224, 224):
        crop = crop.resize((224, 224), Image.BICUBIC)
    pixels = np.asarray(crop).astype(np.float32) * np.float32(1 / 255)
    return ((pixels - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


# ------------------------------------------------------------------------------------- golden / batch


def test_golden_views_through_the_processor_in_one_batch(golden, fixtures_dir, image_processor):
    images = [Image.open(fixtures_dir / "images" / c["image"]).convert("RGB") for c in golden["cases"]]
    boxes = [[r["input_box_xyxy"] for r in c["regions"]] for c in golden["cases"]]
    out = image_processor(images, boxes=boxes)
    regions = [r for c in golden["cases"] for r in c["regions"]]
    assert out["pixel_values"].shape == (56, 3, 3, 224, 224)
    assert out["region_image_index"].tolist() == [
        i for i, c in enumerate(golden["cases"]) for _ in c["regions"]
    ]
    assert out["view_ratios"].tolist() == [[float(np.float32(t)) for t in r["selected_t"]] for r in regions]
    assert out["crop_boxes"].tolist() == [[v["int_view_box"] for v in r["views"]] for r in regions]
    assert out["view_boxes"].tolist() == [[v["target_in_view_224"] for v in r["views"]] for r in regions]
    assert out["view_boxes"].dtype == torch.float32 and out["crop_boxes"].dtype == torch.int64


def test_batch_equals_concatenated_single_calls(fixtures_dir, image_processor, photo, small_image):
    other = Image.open(fixtures_dir / "images" / "COCO_val2014_000000000241.jpg").convert("RGB")
    boxes = [[[10, 20, 200, 220], [300.5, 40.2, 420.8, 300.1]], [[5, 5, 40, 30]], [[0, 0, 640, 100]]]
    batch = image_processor([photo, small_image, other], boxes=boxes)
    singles = [image_processor(image, boxes=b) for image, b in zip([photo, small_image, other], boxes)]
    for key in ["pixel_values", "view_boxes", "view_ratios", "crop_boxes"]:
        assert torch.equal(batch[key], torch.cat([s[key] for s in singles])), key
    assert batch["region_image_index"].tolist() == [0, 0, 1, 2]


def test_pixel_values_match_direct_pil_numpy(image_processor, photo):
    out = image_processor(photo, boxes=[[50.3, 60.7, 250.2, 180.9], [0, 0, 224, 224]])
    for region in range(2):
        for view in range(3):
            crop_box = out["crop_boxes"][region, view].tolist()
            expected = _direct_pixels(photo, crop_box)
            assert np.array_equal(out["pixel_values"][region, view].numpy(), expected), (region, view)
    assert out["crop_boxes"][1, 0].tolist() == [0, 0, 224, 224]  # 224x224 crop: taken as is


# --------------------------------------------------------------------------------------------- threads


@pytest.fixture(scope="module")
def scene():
    """A 640x480 synthetic picture (gradients, coloured blocks, noise): views of it hash differently."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:480, 0:640]
    pixels = np.stack([x * 255 // 639, y * 255 // 479, (x + y) % 256], axis=-1).astype(np.uint8)
    for _ in range(15):
        x1, y1 = rng.integers(0, 600), rng.integers(0, 440)
        pixels[y1 : y1 + rng.integers(5, 200), x1 : x1 + rng.integers(5, 250)] = rng.integers(0, 256, 3)
    pixels[::7] = rng.integers(0, 256, pixels[::7].shape, dtype=np.uint8)
    return Image.fromarray(pixels)


def _assorted_boxes(width: int, height: int, count: int, seed: int) -> list[list[float]]:
    """Thin, sub-pixel, border-touching, large, small and whole-image boxes, then random ones."""
    w, h = width, height
    boxes = [
        [0.2 * w, 0.1 * h, 0.2 * w + 2, 0.9 * h],
        [0.5 * w + 0.3, 0.5 * h + 0.2, 0.5 * w + 0.7, 0.5 * h + 0.6],
        [0, 0.3 * h, 0.25 * w, h],
        [0.05 * w, 0.05 * h, 0.95 * w, 0.9 * h],
        [0.6 * w, 0.2 * h, 0.6 * w + 12, 0.2 * h + 9],
        [0, 0, w, h],
    ]
    rng = np.random.default_rng(seed)
    for _ in range(count):
        x1, y1 = rng.uniform(-5, w), rng.uniform(-5, h)
        boxes.append([x1, y1, x1 + rng.uniform(0, w), y1 + rng.uniform(0, h)])
    return boxes


@pytest.mark.parametrize("num_threads", [2, 3, 8, None])
@pytest.mark.parametrize("view_selection", ["image_prior", "random", [0.3, 1.0]])
def test_threaded_views_are_byte_identical_to_sequential(
    image_processor, scene, small_image, num_threads, view_selection
):
    images = [scene, small_image, np.asarray(scene)[100:400, 50:300], scene.convert("L")]
    sizes = [np.asarray(image).shape[1::-1] for image in images]
    boxes = [_assorted_boxes(width, height, 10, seed) for seed, (width, height) in enumerate(sizes)]
    kwargs = {"boxes": boxes, "view_selection": view_selection, "seed": 5}
    sequential = image_processor(images, num_threads=1, **kwargs)
    threaded = image_processor(images, num_threads=num_threads, **kwargs)
    assert sequential["pixel_values"].shape == (64, 3, 3, 224, 224)
    for key, value in sequential.items():
        other = threaded[key]
        assert (value.dtype, value.shape) == (other.dtype, other.shape), key
        assert value.numpy().tobytes() == other.numpy().tobytes(), key


def test_threaded_pixels_are_upstreams(image_processor, scene):
    out = image_processor(scene, boxes=_assorted_boxes(640, 480, 4, 0), num_threads=4)
    for region in range(len(out["crop_boxes"])):
        for view in range(3):
            crop_box = out["crop_boxes"][region, view].tolist()
            assert np.array_equal(out["pixel_values"][region, view].numpy(), _direct_pixels(scene, crop_box))


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_num_threads_must_be_a_positive_integer(image_processor, small_image, bad):
    with pytest.raises(ValueError, match="num_threads must be a positive integer or None"):
        image_processor(small_image, boxes=[[1, 2, 30, 40]], num_threads=bad)


# ------------------------------------------------------------------------------------ selection modes


def test_explicit_task_and_random_selection(image_processor, small_image):
    box = [[10, 10, 40, 30]]
    explicit = image_processor(small_image, boxes=box, view_selection=[0.3, 0.9])
    assert explicit["view_ratios"].tolist() == [[0.0, pytest.approx(0.3), pytest.approx(0.9)]]
    task = image_processor(small_image, boxes=box, view_selection="task", task="attributes")
    assert task["view_ratios"].tolist() == [[0.0, pytest.approx(0.1), pytest.approx(0.2)]]
    first = image_processor(small_image, boxes=box * 5, view_selection="random", seed=7)
    again = image_processor(small_image, boxes=box * 5, view_selection="random", seed=7)
    assert torch.equal(first["view_ratios"], again["view_ratios"])
    ratios = first["view_ratios"]
    assert torch.all(ratios[:, 0] == 0) and torch.all(ratios[:, 1] != ratios[:, 2])
    with pytest.raises(ValueError, match="task"):
        image_processor(small_image, boxes=box, view_selection="task")
    with pytest.raises(ValueError, match="views 1..2"):
        image_processor(small_image, boxes=box, view_selection=[0.5])


def test_imagehash_phash_option(small_image):
    processor = DynReferImageProcessor(phash_method="imagehash")
    out = processor(small_image, boxes=[[10, 10, 40, 30]])
    assert out["view_ratios"].shape == (1, 3) and out["view_ratios"][0, 0] == 0


def test_normalized_boxes_and_masks(image_processor, small_image):
    pixels = image_processor(small_image, boxes=[[9, 6, 45, 30]])
    normalized = image_processor(small_image, boxes=[[0.1, 0.1, 0.5, 0.5]], normalized_boxes=True)
    assert torch.equal(pixels["crop_boxes"], normalized["crop_boxes"])
    mask = np.zeros((60, 90), bool)
    mask[6:30, 9:45] = True
    from_mask = image_processor(small_image, masks=[mask])
    # upstream's RLE rule: the last mask column/row is the box edge, one pixel inside the painted box
    assert torch.equal(
        from_mask["crop_boxes"], image_processor(small_image, boxes=[[9, 6, 44, 29]])["crop_boxes"]
    )
    with pytest.raises(ValueError, match="masks must be"):
        image_processor(small_image, masks=[np.zeros((10, 10), bool)])


# ------------------------------------------------------------------------------------------ bad input


def test_box_errors(image_processor, small_image):
    with pytest.raises(ValueError, match="exactly one of"):
        image_processor(small_image)
    with pytest.raises(ValueError, match="x1 <= x2"):
        image_processor(small_image, boxes=[[30, 10, 20, 40]])
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            image_processor(small_image, boxes=[[0, 0, bad, 10]])
    with pytest.raises(ValueError, match="covers no pixel"):
        image_processor(small_image, boxes=[[100, 10, 120, 20]])
    with pytest.raises(ValueError, match=r"image 0: boxes must be \[\[x1, y1, x2, y2\], \.\.\.\], got an array of shape \[1, 3\]"):
        image_processor(small_image, boxes=[[1, 2, 3]])
    with pytest.raises(ValueError, match="one entry per image"):
        image_processor([small_image, small_image], boxes=[[[0, 0, 5, 5]]])


def test_zero_area_and_partly_outside_boxes(image_processor, small_image):
    out = image_processor(small_image, boxes=[[20, 20, 20, 20], [89.5, 59.5, 89.7, 59.9], [-15, -5, 30, 100]])
    crops = out["crop_boxes"]
    assert crops[0, 0].tolist() == [19, 19, 20, 20]  # widened to 1 px (docs/upstream/views.md §1)
    assert crops[1, 0].tolist() == [88, 58, 89, 59]
    assert crops[2, 0].tolist() == [0, 0, 30, 60]  # clipped to the image
    assert torch.all(crops[..., 2] <= 90) and torch.all(crops[..., 3] <= 60) and torch.all(crops >= 0)
    # the views of the partly outside box are interpolated from the box as given, then clipped
    assert out["view_ratios"].shape == (3, 3) and torch.isfinite(out["pixel_values"]).all()


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(1, 40),
    st.lists(st.floats(-20, 60, allow_nan=False), min_size=4, max_size=4),
)
def test_any_box_touching_the_image_gives_clipped_nested_crops(width, height, corners):
    x1, x2 = sorted(corners[::2])
    y1, y2 = sorted(corners[1::2])
    image = np.random.default_rng(width * 41 + height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    widened = views.widen_degenerate_box([x1, y1, x2, y2], width, height)
    limits = (width, height, width, height)
    expected_target = [int(np.clip(np.float32(v), 0, limit)) for v, limit in zip(widened, limits)]
    covers_a_pixel = expected_target[2] > expected_target[0] and expected_target[3] > expected_target[1]
    if not covers_a_pixel:
        with pytest.raises(ValueError, match="covers no pixel"):
            DynReferImageProcessor()(image, boxes=[[x1, y1, x2, y2]])
        return
    out = DynReferImageProcessor()(image, boxes=[[x1, y1, x2, y2]], return_tensors="np")
    crops = out["crop_boxes"][0]
    assert isinstance(crops, np.ndarray) and crops.shape == (3, 4)
    assert crops[0].tolist() == expected_target
    assert np.all(crops >= 0) and np.all(crops[:, [0, 2]] <= width) and np.all(crops[:, [1, 3]] <= height)
    assert np.all(crops[:, 2:] > crops[:, :2])
    assert np.all(crops[:, :2] <= crops[0, :2]) and np.all(crops[:, 2:] >= crops[0, 2:])
    assert np.all(out["view_boxes"] >= 0) and np.all(out["view_boxes"] <= 224)
    assert np.isfinite(out["pixel_values"]).all()


def test_no_boxes_for_an_image(image_processor, small_image):
    out = image_processor([small_image, small_image], boxes=[[], [[1, 1, 9, 9]]])
    assert out["region_image_index"].tolist() == [1]
    empty = image_processor(small_image, boxes=[])
    assert empty["pixel_values"].shape == (0, 3, 3, 224, 224) and empty["view_boxes"].shape == (0, 3, 4)


def test_image_modes(image_processor, small_image):
    box = [[10, 10, 50, 40]]
    rgb_out = image_processor(small_image, boxes=box)
    rgba = small_image.copy()
    rgba.putalpha(128)
    assert torch.equal(
        image_processor(rgba, boxes=box)["pixel_values"], rgb_out["pixel_values"]
    )  # alpha dropped
    for mode in ("L", "CMYK", "P"):
        converted = small_image.convert(mode)
        expected = image_processor(converted.convert("RGB"), boxes=box)["pixel_values"]
        assert torch.equal(image_processor(converted, boxes=box)["pixel_values"], expected), mode
    grey = np.asarray(small_image.convert("L"))
    grey_out = image_processor(small_image.convert("L"), boxes=box)
    assert torch.equal(image_processor(grey, boxes=box)["pixel_values"], grey_out["pixel_values"])
    # 16-bit images are rescaled to 8 bits (x * 255 / 65535, rounded), not clipped to white
    wide = np.asarray(small_image.convert("L")).astype(np.uint16) * 257  # 8-bit v -> 16-bit v * 257
    for sixteen_bit in (Image.fromarray(wide), wide, np.repeat(wide[:, :, None], 3, axis=2)):
        assert torch.equal(image_processor(sixteen_bit, boxes=box)["pixel_values"], grey_out["pixel_values"])
    with pytest.raises(ValueError, match="'I'"):
        image_processor(Image.fromarray(np.zeros((20, 20), np.int32)), boxes=[[0, 0, 5, 5]])
    with pytest.raises(ValueError, match="'F'"):
        image_processor(Image.fromarray(np.zeros((20, 20), np.float32)), boxes=[[0, 0, 5, 5]])
    with pytest.raises(ValueError, match="float32"):
        image_processor(np.zeros((20, 20, 3), np.float32), boxes=[[0, 0, 5, 5]])
    with pytest.raises(TypeError, match="PIL images or NumPy"):
        image_processor(torch.zeros(3, 20, 20).tolist(), boxes=[[[0, 0, 5, 5]]])


def test_one_pixel_image(image_processor):
    image = Image.fromarray(np.array([[[200, 10, 30]]], dtype=np.uint8))
    out = image_processor(image, boxes=[[0, 0, 1, 1]])
    assert out["crop_boxes"].tolist() == [[[0, 0, 1, 1]] * 3]
    assert out["view_boxes"].tolist() == [[[0, 0, 224, 224]] * 3]
    assert np.array_equal(out["pixel_values"][0, 0].numpy(), _direct_pixels(image, (0, 0, 1, 1)))


# ------------------------------------------------------------------------------------------ save/load


def test_image_processor_save_load(tmp_path):
    processor = DynReferImageProcessor(num_views=2, size={"height": 64, "width": 64}, view_selection="random")
    processor.save_pretrained(tmp_path)
    for loaded in (
        DynReferImageProcessor.from_pretrained(tmp_path),
        AutoImageProcessor.from_pretrained(tmp_path),
    ):
        assert isinstance(loaded, DynReferImageProcessor)
        assert loaded.to_dict() == processor.to_dict()
    out = loaded(Image.new("RGB", (50, 40), "red"), boxes=[[1, 1, 20, 20]], seed=0)
    assert out["pixel_values"].shape == (1, 2, 3, 64, 64)


def test_processor_save_load(tmp_path, small_image):
    processor = DynReferProcessor(
        DynReferImageProcessor(num_views=2), make_tiny_tokenizer(), max_text_length=16
    )
    processor.save_pretrained(tmp_path)
    DynReferConfig(num_views=2).save_pretrained(tmp_path)
    for loaded in (DynReferProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert isinstance(loaded, DynReferProcessor)
        assert loaded.image_processor.to_dict() == processor.image_processor.to_dict()
        assert loaded.max_text_length == 16
        kwargs = {"boxes": [[3, 3, 30, 30]], "controls": [["dog"]], "text": ["a white dog"]}
        for key, value in processor(small_image, **kwargs).items():
            assert torch.equal(loaded(small_image, **kwargs)[key], value), key


# ------------------------------------------------------------------------------------ prompts, labels


def test_control_prompts_and_labels(small_image):
    tokenizer = make_tiny_tokenizer()
    processor = DynReferProcessor(DynReferImageProcessor(), tokenizer)
    captions = ["a white dog", " ".join(["the man riding a horse on the beach"] * 6)]
    out = processor(
        [small_image, small_image],
        boxes=[[[1, 1, 20, 20]], [[5, 5, 50, 40]]],
        controls=[["dog", "grass"], "man, horse"],
        text=captions,
    )
    expected = tokenizer(["dog,grass|", "man,horse|"], padding="longest", return_tensors="pt")
    assert torch.equal(out["input_ids"], expected["input_ids"])
    assert torch.equal(out["attention_mask"], expected["attention_mask"])
    assert processor.batch_decode(out["input_ids"]) == ["dog,grass|", "man,horse|"]
    labels = out["labels"]
    assert labels.shape == (2, 32)  # the long caption is truncated to max_text_length
    first = tokenizer(captions[0])["input_ids"]
    assert labels[0, : len(first)].tolist() == first and first[-1] == tokenizer.eos_token_id
    assert torch.all(labels[0, len(first) :] == -100)
    assert torch.equal(out["decoder_attention_mask"], (labels != -100).long())
    assert labels[1, -1].item() == tokenizer.eos_token_id
    assert processor.decode(labels[0, : len(first)]) == "a white dog"
    empty = processor(small_image, boxes=[[1, 1, 20, 20]], controls=[[]])
    assert processor.batch_decode(empty["input_ids"], skip_special_tokens=False)[0].startswith("|")
    with pytest.raises(ValueError, match="one entry per region"):
        processor(small_image, boxes=[[1, 1, 20, 20]], controls=[["a"], ["b"]])
