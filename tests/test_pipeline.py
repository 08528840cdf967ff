"""The ``region-captioning`` pipeline, loaded through ``transformers.pipeline`` from a saved tiny model."""

import functools
import http.server
import threading

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import pipeline

import dynrefer_hf  # (registers the task)
from dynrefer_hf.pipelines import RegionCaptioningPipeline

GENERATION = {"max_new_tokens": 5, "min_length": 3}
BF16_STEP = 2.0**-8  # head scores are rounded to bfloat16: float noise can move them by one step


@pytest.fixture(scope="module")
def model_folder(tiny_region_captioner):
    return tiny_region_captioner


@pytest.fixture(scope="module")
def describe(model_folder):
    return pipeline("region-captioning", model=str(model_folder), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def images(fixtures_dir):
    paths = sorted((fixtures_dir / "images").glob("*.jpg"))[:2]
    return [str(path) for path in paths]


def threshold_tagging_about_half(describe, image_path, boxes):
    """A tag threshold at which about half of the regions get tags: the median of their best tag probability."""
    features = describe.image_processor(PIL.Image.open(image_path).convert("RGB"), boxes=[boxes])
    with torch.no_grad():
        queries = describe.model.get_region_queries(
            features["pixel_values"].to(describe.model.dtype), features["view_boxes"]
        )
        tag_logits = describe.model.predict_labels(queries)[0]
    return float(torch.sigmoid(tag_logits).amax(dim=1).median())


def region_by_region(describe, image_path, boxes, controls, tag_threshold=None, **generate_kwargs):
    """Reference: each region through the processor and ``model.generate`` on its own."""
    image = PIL.Image.open(image_path).convert("RGB")
    records = []
    for box, words in zip(boxes, controls):
        inputs = describe.processor(images=image, boxes=[[box]], controls=[words])
        inputs["pixel_values"] = inputs["pixel_values"].to(describe.model.dtype)
        outputs = describe.model.generate(**inputs, tag_threshold=tag_threshold, **generate_kwargs)
        records += describe.processor.post_process_generation(outputs, describe.model.config.tag_names)
    return records


def assert_same_region(result, record, config, exact):
    """``result`` (pipeline) describes the region as ``record`` (reference) does.

    With ``exact=False`` (float32) scores may differ by rounding: the varied tiny model's wide random
    weights amplify the last-bit differences of matrix products of other shapes (other chunk sizes,
    other prompt padding) to ~1e-3 relative; in float64 the same comparison is exact.
    """
    assert result["caption"] == record["caption"]
    assert result["tags"] == record["tags"]
    attribute_scores = dict(zip(config.attribute_names, record["attribute_scores"]))
    class_scores = np.array(record["class_scores"])
    best = int(np.argmax(class_scores))
    if exact:
        assert result["score"] == record["score"]
        assert all(
            attribute["score"] == attribute_scores[attribute["name"]] for attribute in result["attributes"]
        )
        assert result["label"] == {"name": config.class_names[best], "score": class_scores[best]}
        return
    assert result["score"] == pytest.approx(record["score"], rel=5e-3)
    for attribute in result["attributes"]:
        assert attribute["score"] == pytest.approx(attribute_scores[attribute["name"]], abs=BF16_STEP)
    best_score, runner_up = np.sort(class_scores)[::-1][:2]
    if best_score - runner_up > 2 * BF16_STEP:  # a clear winner must win in both
        assert result["label"]["name"] == config.class_names[best]
    assert result["label"]["score"] == pytest.approx(best_score, abs=BF16_STEP)


@pytest.mark.slow
def test_factory_builds_the_pipeline_from_a_saved_folder(describe, images):
    assert isinstance(describe, RegionCaptioningPipeline)
    assert describe.model.__class__.__name__ == "DynReferForRegionCaptioning"
    assert describe.image_processor.size == {"height": 56, "width": 56}
    config = describe.model.config
    results = describe(
        images[0], boxes=[[10, 20, 200, 300], [300, 100, 600, 400]], attribute_top_k=2, **GENERATION
    )
    assert len(results) == 2
    for result, box in zip(results, ([10, 20, 200, 300], [300, 100, 600, 400])):
        assert set(result) == {"box", "caption", "score", "tags", "attributes", "label"}
        assert result["box"] == [float(value) for value in box]
        assert isinstance(result["caption"], str) and 0.0 < result["score"] <= 1.0
        assert set(result["tags"]) <= set(config.tag_names)
        assert len(result["attributes"]) == 2
        assert [a["score"] for a in result["attributes"]] == sorted(
            (a["score"] for a in result["attributes"]), reverse=True
        )
        assert {a["name"] for a in result["attributes"]} <= set(config.attribute_names)
        assert result["label"]["name"] in config.class_names
    all_attributes = describe(images[0], boxes=[[10, 20, 200, 300]], attribute_top_k=None, **GENERATION)[0][
        "attributes"
    ]
    assert sorted(a["name"] for a in all_attributes) == sorted(config.attribute_names)
    assert all_attributes[:2] == results[0]["attributes"]


def test_the_default_model_is_a_source_and_the_shipped_model_has_a_path_of_its_own():
    from transformers import AutoConfig

    from dynrefer_hf.pipelines import DEFAULT_MODEL

    # the shipped model's folder, loadable as it is; the default model is a (name_or_path, revision) pair
    assert AutoConfig.from_pretrained(dynrefer_hf.SHAPES_DEMO_PATH).model_type == "dynrefer"
    assert DEFAULT_MODEL.name_or_path == str(dynrefer_hf.SHAPES_DEMO_PATH) and DEFAULT_MODEL.revision is None
    assert repr(DEFAULT_MODEL).startswith("ModelSource(name_or_path=")
    # what the factory loads when no model is named
    assert pipeline("region-captioning").model.name_or_path == DEFAULT_MODEL.name_or_path


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_any_batch_size_gives_the_region_by_region_results(describe, model_folder, images, dtype):
    if dtype != torch.float32:
        describe = pipeline("region-captioning", model=str(model_folder), device="cpu", dtype=dtype)
    boxes = [
        [10, 20, 200, 300],
        [300, 100, 600, 400],
        [0, 0, 640, 478],
        [50, 50, 90, 120],
        [100, 200, 400, 470],
        [5, 5, 30, 30],
        [400, 10, 630, 200],
    ]
    # Prompts of different lengths, so each chunk pads its control prompts differently.
    controls = [["dog"], [], ["red", "car", "sky"], "beach,man,tree,road,grass", None, ["man"], []]
    tag_threshold = threshold_tagging_about_half(describe, images[0], boxes)
    reference = region_by_region(
        describe,
        images[0],
        boxes,
        [words or [] for words in controls],
        tag_threshold=tag_threshold,
        **GENERATION,
    )
    assert len({record["caption"] for record in reference}) > 3  # the regions are told apart
    assert any(record["tags"] for record in reference) and not all(record["tags"] for record in reference)
    config = describe.model.config
    for batch_size in (1, 3, 100):
        results = describe(
            images[0],
            boxes=boxes,
            controls=controls,
            batch_size=batch_size,
            tag_threshold=tag_threshold,
            **GENERATION,
        )
        assert [result["box"] for result in results] == [[float(v) for v in box] for box in boxes]
        for result, record in zip(results, reference, strict=True):
            assert_same_region(result, record, config, exact=dtype == torch.float64)


@pytest.mark.slow
def test_batch_size_sets_the_regions_per_forward_pass(describe, images, monkeypatch):
    chunk_sizes = []
    generate = describe.model.generate

    def counting(**inputs):
        chunk_sizes.append(len(inputs["pixel_values"]))
        return generate(**inputs)

    monkeypatch.setattr(describe.model, "generate", counting)
    boxes = [[10, 20, 200, 300]] * 5
    describe(images[0], boxes=boxes, batch_size=2, max_new_tokens=2)
    assert chunk_sizes == [2, 2, 1]
    chunk_sizes.clear()
    describe(
        images, boxes=[boxes, boxes[:3]], max_new_tokens=2
    )  # default: 20 regions, chunks never span images
    assert chunk_sizes == [5, 3]
    chunk_sizes.clear()
    set_at_init = RegionCaptioningPipeline(model=describe.model, processor=describe.processor, batch_size=4)
    set_at_init(images[0], boxes=boxes, max_new_tokens=2)
    assert chunk_sizes == [4, 1]


def test_views_of_the_next_chunk_are_built_while_the_model_runs(describe, monkeypatch):
    events = []
    next_views_built = threading.Event()
    processor, generate = describe.processor, describe.model.generate

    class Building:  # the pipeline's processor, recording when views are built
        def __call__(self, *args, **kwargs):
            events.append(("views", threading.current_thread() is threading.main_thread()))
            features = processor(*args, **kwargs)
            if len(events) > 1:
                next_views_built.set()
            return features

        def __getattr__(self, name):
            return getattr(processor, name)

    def describing(**inputs):
        # the first forward pass waits until the second chunk's views exist: they are built meanwhile
        events.append(("model", next_views_built.wait(timeout=60)))
        return generate(**inputs)

    monkeypatch.setattr(describe, "processor", Building())
    monkeypatch.setattr(describe.model, "generate", describing)
    image = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    results = describe(image, boxes=[[10, 20, 200, 230]] * 3, batch_size=2, max_new_tokens=2)
    assert len(results) == 3
    assert events == [("views", False), ("views", False), ("model", True), ("model", True)]


def test_prefetched_keeps_order_raises_when_due_and_closes_its_source():
    from dynrefer_hf.pipelines.region_captioning import _prefetched

    def chunks(log):
        try:
            yield 1
            yield 2
            raise ValueError("chunk 3 is bad")
        finally:
            log.append("closed")

    log = []
    items = _prefetched(chunks(log))
    assert next(items) == 1 and next(items) == 2
    with pytest.raises(ValueError, match="chunk 3 is bad"):
        next(items)
    log = []
    items = _prefetched(chunks(log))
    assert next(items) == 1
    items.close()
    assert log == ["closed"]


@pytest.mark.slow
def test_controls_reach_the_prompt_before_the_predicted_tags(describe, images):
    box = [[300, 100, 600, 400]]
    plain = describe(images[0], boxes=box, **GENERATION)[0]
    steered = describe(images[0], boxes=box, controls="dog,grass", **GENERATION)[0]
    reference = region_by_region(describe, images[0], box, [["dog", "grass"]], **GENERATION)[0]
    assert steered["caption"] == reference["caption"] != plain["caption"]
    assert steered["tags"] == plain["tags"]  # controls steer the caption, not the heads


@pytest.mark.slow
def test_several_images_in_every_input_form(describe, images):
    boxes = [[[10, 20, 200, 300], [300, 100, 600, 400], [0, 0, 100, 100]], [[20, 30, 220, 330]]]
    one_by_one = [
        describe(image, boxes=image_boxes, **GENERATION) for image, image_boxes in zip(images, boxes)
    ]
    as_list = describe(images, boxes=boxes, **GENERATION)
    as_dicts = describe([{"image": image, "boxes": b} for image, b in zip(images, boxes)], **GENERATION)
    pil_and_numpy = [PIL.Image.open(images[0]), np.asarray(PIL.Image.open(images[1]).convert("RGB"))]
    as_arrays = describe(pil_and_numpy, boxes=boxes, **GENERATION)
    streamed = list(describe(({"image": image, "boxes": b} for image, b in zip(images, boxes)), **GENERATION))
    assert [len(results) for results in as_list] == [3, 1]
    for other in (as_dicts, as_arrays, streamed):
        for got, expected in zip(other, one_by_one, strict=True):
            assert [r["caption"] for r in got] == [r["caption"] for r in expected]
            assert [r["score"] for r in got] == pytest.approx([r["score"] for r in expected], rel=1e-5)
    for got, expected in zip(as_list, one_by_one, strict=True):
        assert [r["caption"] for r in got] == [r["caption"] for r in expected]


@pytest.mark.slow
def test_masks_are_described_as_the_box_upstream_derives_from_them(describe, images):
    height, width = 478, 640
    integer_boxes = [[30, 40, 210, 300], [320, 110, 600, 400]]
    masks = np.zeros((2, height, width), dtype=bool)
    for mask, (x1, y1, x2, y2) in zip(masks, integer_boxes):
        mask[y1:y2, x1:x2] = True
    with_masks = describe(images[0], masks=masks, **GENERATION)
    # Upstream's RLE rule keeps the last row/column holding the mask: (x1, y1, x2 - 1, y2 - 1).
    derived = [[x1, y1, x2 - 1, y2 - 1] for x1, y1, x2, y2 in integer_boxes]
    assert [result["box"] for result in with_masks] == [[float(v) for v in box] for box in derived]
    with_boxes = describe(images[0], boxes=derived, **GENERATION)
    assert [r["caption"] for r in with_masks] == [r["caption"] for r in with_boxes]
    # saved as SAM and mask PNGs save them: 0 / 255
    as_saved = describe(images[0], masks=masks.astype(np.uint8) * 255, **GENERATION)
    assert as_saved == with_masks


def test_return_views_reports_what_the_image_processor_built(describe, images):
    boxes = [[10, 20, 200, 300], [300, 100, 600, 400]]
    results = describe(images[0], boxes=boxes, return_views=True, view_selection=[0.3, 0.6], **GENERATION)
    features = describe.image_processor(PIL.Image.open(images[0]), boxes=[boxes], view_selection=[0.3, 0.6])
    for index, result in enumerate(results):
        assert result["views"]["ratios"] == pytest.approx([0.0, 0.3, 0.6])
        assert result["views"]["crop_boxes"] == features["crop_boxes"][index].tolist()
        assert result["views"]["view_boxes"] == features["view_boxes"][index].tolist()


@pytest.mark.slow
def test_images_from_a_url(describe, images):
    folder, name = images[0].rsplit("/", 1)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=folder)
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{name}"
        from_url = describe(url, boxes=[[10, 20, 200, 300]], **GENERATION)
        with pytest.raises(ValueError, match="could not download"):
            describe(url + ".missing", boxes=[[10, 20, 200, 300]], **GENERATION)
    finally:
        server.shutdown()
    assert (
        from_url[0]["caption"] == describe(images[0], boxes=[[10, 20, 200, 300]], **GENERATION)[0]["caption"]
    )


@pytest.mark.slow
def test_bfloat16_weights(model_folder, images):
    describe_bf16 = pipeline("region-captioning", model=str(model_folder), device="cpu", dtype=torch.bfloat16)
    assert describe_bf16.model.dtype == torch.bfloat16
    results = describe_bf16(images[0], boxes=[[10, 20, 200, 300], [300, 100, 600, 400]], **GENERATION)
    assert len(results) == 2 and all(isinstance(result["caption"], str) for result in results)


@pytest.mark.slow
def test_progress_bar_counts_regions(describe, images, capsys):
    describe(images[0], boxes=[[10, 20, 200, 300]] * 3, batch_size=1, progress_bar=True, max_new_tokens=2)
    assert "3/3" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda d, image: d(image), ValueError, "no regions given"),
        (lambda d, image: d(image, boxes=[]), ValueError, "boxes is empty"),
        (lambda d, image: d(image, boxes=[[1, 2, 3]]), ValueError, r"\[\[x1, y1, x2, y2\], \.\.\.\]"),
        (lambda d, image: d(image, boxes=[[5, 5, 1, 1]]), ValueError, "x1 <= x2"),
        (lambda d, image: d(image, boxes=[[1, 1, 9, 9]], masks=np.ones((1, 9, 9))), ValueError, "not both"),
        (
            lambda d, image: d(image, masks=np.zeros((1, 478, 640), bool)),
            ValueError,
            "mask 0: the mask is empty",
        ),
        (
            lambda d, image: d(image, masks=np.ones((1, 4, 4), bool)),
            ValueError,
            r"masks must be \[R, H, W\] with the image's \(H, W\) = \(478, 640\), got \[1, 4, 4\]",
        ),
        (lambda d, image: d([image, image], boxes=[[[1, 1, 9, 9]]]), ValueError, "one entry per image"),
        (
            lambda d, image: d(image, boxes=[[1, 1, 9, 9]], controls=[["a"], ["b"]]),
            ValueError,
            "controls has 2",
        ),
        (lambda d, image: d(image, boxes=[[1, 1, 9, 9]], batch_size=0), ValueError, "batch_size"),
        (
            lambda d, image: d("no/such/image.jpg", boxes=[[1, 1, 9, 9]]),
            FileNotFoundError,
            "no/such/image.jpg",
        ),
    ],
)
def test_bad_input_is_named(describe, images, call, error, message):
    with pytest.raises(error, match=message):
        call(describe, images[0])


def test_unreadable_image_file(describe, tmp_path):
    path = tmp_path / "not_an_image.jpg"
    path.write_text("hello")
    with pytest.raises(ValueError, match="not a readable image"):
        describe(str(path), boxes=[[1, 1, 9, 9]])


def test_generate_on_the_processors_output_gives_the_pipelines_records(describe, images):
    """The Transformers way, `model.generate(**processor(...))` and the processor's post-processing, gives what
    the pipeline gives (user words and views included)."""
    image = PIL.Image.open(images[0]).convert("RGB")
    boxes = [[10, 20, 200, 300], [300, 100, 600, 400], [0, 0, 640, 478]]
    controls = [["dog"], [], "red,car"]
    expected = describe(image, boxes=boxes, controls=controls, return_views=True, **GENERATION)
    model, processor = describe.model, describe.processor
    inputs = processor(images=image, boxes=boxes, controls=controls)
    outputs = model.generate(**inputs, **GENERATION)
    assert processor.post_process_region_captioning(outputs, inputs, model.config, return_views=True) == [expected]


def test_generate_gives_the_demo_pipelines_records_exactly():
    """On the shipped demonstration model (its saved control-prompt table) the two ways agree exactly."""
    from transformers import AutoModel, AutoProcessor

    from dynrefer_hf.pretrained import SHAPES_DEMO_PATH

    image = np.random.default_rng(1).integers(0, 256, (200, 260, 3), dtype=np.uint8)
    boxes = [[10, 10, 120, 120], [50, 60, 200, 180], [0, 0, 260, 200]]
    controls = [["red"], [], "blue,circle"]
    expected = pipeline("region-captioning", device="cpu", dtype=torch.float32)(image, boxes=boxes, controls=controls)
    model, processor = AutoModel.from_pretrained(SHAPES_DEMO_PATH), AutoProcessor.from_pretrained(SHAPES_DEMO_PATH)
    assert model.config.control_prompt_tokens == processor.tokenize_tag_vocabulary(model.config.tag_names)
    inputs = processor(images=image, boxes=boxes, controls=controls)
    assert processor.post_process_region_captioning(model.generate(**inputs), inputs, model.config) == [expected]


def test_heads_only_gives_the_full_paths_labels_without_the_language_model(describe, images, monkeypatch):
    boxes = [[10, 20, 200, 300], [300, 100, 600, 400]]
    full = describe(images[0], boxes=boxes, attribute_top_k=None, **GENERATION)

    def refuse(*args, **kwargs):
        raise AssertionError("the language model ran")

    monkeypatch.setattr(describe.model.language_model, "forward", refuse)
    monkeypatch.setattr(describe.model.language_model, "generate", refuse)
    heads = describe(images[0], boxes=boxes, attribute_top_k=None, generate_captions=False)
    for got, result in zip(heads, full, strict=True):
        assert set(got) == {"box", "tags", "attributes", "label"}
        assert got == {key: result[key] for key in got}
    with pytest.raises(ValueError, match="generate_captions=False"):
        describe(images[0], boxes=boxes, generate_captions=False, max_new_tokens=3)
    with pytest.raises(TypeError, match="generate_captions"):
        describe(images[0], boxes=boxes, generate_captions="no")
