"""Property test (hypothesis): random malformed inputs to the image processor and the pipeline give either a
result or one of the documented exception types (ValueError, TypeError, FileNotFoundError), never another
exception (docs/reliability.md)."""

import numpy as np
import PIL.Image
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transformers import pipeline

from dynrefer_hf import DynReferImageProcessor

DOCUMENTED = (ValueError, TypeError, FileNotFoundError)

numbers = st.one_of(
    st.integers(-50, 150), st.floats(allow_nan=True, allow_infinity=True, width=32), st.booleans()
)
scalars = st.one_of(st.none(), numbers, st.text(max_size=4))
boxes = st.one_of(
    scalars,
    st.lists(numbers, max_size=6),
    st.lists(st.lists(numbers, min_size=0, max_size=5), max_size=3),
    st.lists(st.lists(st.lists(numbers, min_size=4, max_size=4), max_size=2), max_size=2),
)


@st.composite
def arrays(draw):
    dtype = draw(st.sampled_from([np.uint8, np.uint16, np.int32, np.float32, np.float64, np.bool_]))
    shape = draw(st.lists(st.integers(0, 12), min_size=1, max_size=4))
    values = np.random.default_rng(draw(st.integers(0, 1000))).integers(0, 300, shape)
    return values.astype(dtype)


@st.composite
def pil_images(draw):
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P", "I", "F", "I;16", "1", "CMYK"]))
    return PIL.Image.new(mode, (draw(st.integers(1, 16)), draw(st.integers(1, 16))))


images = st.one_of(scalars, arrays(), pil_images(), st.lists(st.one_of(arrays(), pil_images()), max_size=2))
masks = st.one_of(st.none(), arrays(), st.lists(arrays(), max_size=2))
options = st.fixed_dictionaries(
    {},
    optional={
        "view_selection": st.one_of(
            scalars, st.sampled_from(["random", "task", "image_prior"]), st.lists(numbers, max_size=3)
        ),
        "task": st.one_of(scalars, st.sampled_from(["attributes", "captioning"])),
        "normalized_boxes": st.booleans(),
        "seed": scalars,
    },
)


@pytest.fixture(scope="module")
def processor():
    return DynReferImageProcessor(size={"height": 28, "width": 28})


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(images=images, boxes=boxes, masks=masks, kwargs=options)
@example(
    images=np.full((20, 24, 3), 128, np.uint8), boxes=[[1, 2, 10, 12]], masks=None, kwargs={}
)  # a result
@pytest.mark.slow
def test_processor_gives_a_result_or_a_documented_error(processor, images, boxes, masks, kwargs):
    try:
        out = processor(images, boxes=boxes, masks=masks, **kwargs)
    except DOCUMENTED:
        return
    regions = out["pixel_values"].shape[0]
    assert out["view_boxes"].shape == (regions, 3, 4) and out["region_image_index"].shape == (regions,)


@pytest.fixture(scope="module")
def describe(tiny_region_captioner):
    return pipeline("region-captioning", model=str(tiny_region_captioner), device="cpu")


call_options = st.fixed_dictionaries(
    {},
    optional={
        "tag_threshold": scalars,
        "attribute_top_k": scalars,
        "batch_size": scalars,
        "controls": st.one_of(
            scalars, st.lists(st.one_of(scalars, st.lists(st.text(max_size=3), max_size=2)), max_size=3)
        ),
        "return_views": scalars,
        "num_beams": scalars,
        "view_selection": st.one_of(scalars, st.lists(numbers, max_size=3)),
    },
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(images=images, boxes=boxes, masks=masks, kwargs=call_options)
@example(
    images=np.full((20, 24, 3), 128, np.uint8), boxes=[[1, 2, 10, 12]], masks=None, kwargs={}
)  # a result
@pytest.mark.slow
def test_pipeline_gives_a_result_or_a_documented_error(describe, images, boxes, masks, kwargs):
    try:
        results = describe(images, boxes=boxes, masks=masks, max_new_tokens=2, **kwargs)
    except DOCUMENTED:
        return
    flat = (
        results
        if not results or isinstance(results[0], dict)
        else [r for per_image in results for r in per_image]
    )
    assert all(isinstance(result["caption"], str) and len(result["box"]) == 4 for result in flat)
