"""The synthetic shapes scenes: determinism, the record schema, and labels that agree with the pixels."""

import numpy as np
import pytest

from dynrefer_hf.data import region_features, validate_region_record
from dynrefer_hf.shapes import (
    CAPTION_FIELDS,
    CONTEXT_LABEL_SIZES,
    SHAPES_VOCABULARY,
    build_shapes_dataset,
    caption_field_accuracy,
    context_labels,
    parse_caption,
    scene_record,
    shapes_scene,
    shapes_split,
)


@pytest.fixture(scope="module")
def scenes():
    return shapes_split("train", 6, seed=3)


def test_same_seed_same_scenes_and_any_subset_can_be_rebuilt(scenes):
    again = shapes_split("train", 6, seed=3)
    tail = shapes_split("train", 2, seed=3, start=4)
    for index in range(6):
        first, second = scenes[index], again[index]
        assert np.array_equal(np.asarray(first["image"]), np.asarray(second["image"]))
        assert {k: v for k, v in first.items() if k != "image"} == {
            k: v for k, v in second.items() if k != "image"
        }
    assert np.array_equal(np.asarray(tail[1]["image"]), np.asarray(scenes[5]["image"]))
    assert tail[1]["captions"] == scenes[5]["captions"]
    other_seed = shapes_split("train", 1, seed=4)[0]
    other_split = shapes_split("test", 1, seed=3)[0]
    for other in (other_seed, other_split):
        assert np.asarray(other["image"]).shape != np.asarray(scenes[0]["image"]).shape or not np.array_equal(
            np.asarray(other["image"]), np.asarray(scenes[0]["image"])
        )


def test_one_scene_alone_is_the_one_the_split_stores(scenes):
    for index in (0, 5):
        scene = shapes_scene("train", index, seed=3)
        assert np.array_equal(np.asarray(scene.image), np.asarray(scenes[index]["image"]))
        assert scene_record(scene, image_id=index)["captions"] == scenes[index]["captions"]
    with pytest.raises(ValueError, match="unknown split 'val'"):
        shapes_scene("val", 0)


def test_schema_and_ranges(scenes):
    assert scenes.features == region_features(SHAPES_VOCABULARY)
    for record in scenes:
        validate_region_record(record, SHAPES_VOCABULARY)
        width, height = record["image"].size
        assert 224 <= width <= 448 and 224 <= height <= 448
        assert 3 <= len(record["boxes"]) <= 8
    splits = build_shapes_dataset(num_train=2, num_validation=1, num_test=1, seed=3)
    assert {name: len(split) for name, split in splits.items()} == {"train": 2, "validation": 1, "test": 1}


def _centre(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def test_caption_tags_attributes_and_class_agree(scenes):
    vocabulary = SHAPES_VOCABULARY
    for record in scenes:
        centres = [_centre(box) for box in record["boxes"]]
        for index, caption in enumerate(record["captions"]):
            words = caption.split()
            size, colour, texture, shape = words[:4]
            assert shape == vocabulary.classes[record["classes"][index]]
            labels = dict(zip(vocabulary.attributes, record["attributes"][index]))
            assert labels[f"color:{colour}"] == 1 and labels[f"texture:{texture}"] == 1
            for group in ("color", "texture", "size"):
                group_labels = [v for name, v in labels.items() if name.startswith(group + ":")]
                assert sorted(group_labels) in ([0] * (len(group_labels) - 1) + [1], [-1] * len(group_labels))
            assert labels[f"size:{size}"] in (1, -1)
            # The reference is the nearest other shape; the relation follows the dominant axis.
            distances = [np.hypot(cx - centres[index][0], cy - centres[index][1]) for cx, cy in centres]
            distances[index] = np.inf
            reference = int(np.argmin(distances))
            dx = centres[index][0] - centres[reference][0]
            dy = centres[index][1] - centres[reference][1]
            relation = (
                ("left of" if dx < 0 else "right of")
                if abs(dx) >= abs(dy)
                else ("above" if dy < 0 else "below")
            )
            ref_shape = vocabulary.classes[record["classes"][reference]]
            ref_colour = record["captions"][reference].split()[1]
            article = "an" if ref_colour[0] in "aeiou" else "a"
            assert (
                caption == f"{size} {colour} {texture} {shape} {relation} {article} {ref_colour} {ref_shape}"
            )
            assert set(record["tags"][index]) == {size, colour, texture, shape, ref_colour, ref_shape}


def test_boxes_are_tight(scenes):
    for record in scenes:
        pixels = np.asarray(record["image"]).astype(int)
        background = np.median(pixels.reshape(-1, 3), axis=0)
        is_object = np.abs(pixels - background).max(axis=2) > 12  # the grain is at most +-6
        height, width = is_object.shape
        for x1, y1, x2, y2 in (map(int, box) for box in record["boxes"]):
            assert is_object[y1, x1:x2].any() and is_object[y2 - 1, x1:x2].any()
            assert is_object[y1:y2, x1].any() and is_object[y1:y2, x2 - 1].any()
            ring = np.zeros_like(is_object)
            ring[max(y1 - 1, 0) : min(y2 + 1, height), max(x1 - 1, 0) : min(x2 + 1, width)] = True
            ring[y1:y2, x1:x2] = False
            assert not is_object[ring].any()


def test_validate_region_record_names_the_problem(scenes):
    record = dict(scenes[0])
    cases = [
        ({"captions": record["captions"][:-1]}, "captions"),
        ({"boxes": [[5, 5, 2, 9]] + record["boxes"][1:]}, "empty or outside"),
        ({"boxes": [[0, 0, 1e5, 9]] + record["boxes"][1:]}, "empty or outside"),
        ({"tags": [["unicorn"]] + record["tags"][1:]}, "unicorn"),
        ({"attributes": [[1, 0]] + record["attributes"][1:]}, "attribute row"),
        ({"classes": [99] + record["classes"][1:]}, "class index 99"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            validate_region_record({**record, **change}, SHAPES_VOCABULARY)


def test_parse_caption_reads_every_field_of_every_caption(scenes):
    assert parse_caption("small red striped circle left of a blue square") == {
        "size": "small",
        "colour": "red",
        "texture": "striped",
        "class": "circle",
        "relation": "left of",
        "neighbour_colour": "blue",
        "neighbour_class": "square",
    }
    assert parse_caption("  large  orange dotted star below an orange cross ")["relation"] == "below"
    for caption in [caption for captions in scenes["captions"] for caption in captions]:
        fields = parse_caption(caption)
        words = caption.split()
        assert [fields[name] for name in CAPTION_FIELDS[:4]] == words[:4]
        assert (fields["neighbour_colour"], fields["neighbour_class"]) == tuple(words[-2:])
        assert fields["relation"] == " ".join(words[4:-3])
    for malformed in ("", "small red striped circle", "small red striped circle left of a blue", "huge red ..."):
        assert parse_caption(malformed) is None


def test_caption_field_accuracy_counts_each_word_and_malformed_captions_as_wrong():
    references = [
        "small red striped circle left of a blue square",
        "large green solid star above a red cross",
        "medium black dotted diamond below an orange triangle",
        "small yellow checkered cross right of a purple circle",
    ]
    predictions = [
        references[0],  # all right
        "large green solid star below a red square",  # relation and neighbour class wrong
        "medium black dotted",  # not the template: wrong everywhere
        "medium yellow checkered cross right of a purple circle",  # size wrong
    ]
    accuracy = caption_field_accuracy(predictions, references)
    assert accuracy == {
        "size": 2 / 4,
        "colour": 3 / 4,
        "texture": 3 / 4,
        "class": 3 / 4,
        "relation": 2 / 4,
        "neighbour_colour": 3 / 4,
        "neighbour_class": 2 / 4,
        "well_formed": 3 / 4,
        "all": 1 / 4,
    }
    with pytest.raises(ValueError, match="3 predictions for 4"):
        caption_field_accuracy(predictions[:3], references)
    with pytest.raises(ValueError, match="does not follow"):
        caption_field_accuracy(["a"], ["a red circle"])


def test_context_labels_index_the_context_words():
    assert context_labels("small red striped circle left of a blue square") == [0, 2, 1]
    assert context_labels("medium black dotted diamond below an orange triangle") == [3, 5, 2]
    assert CONTEXT_LABEL_SIZES == (4, 7, 6)
    with pytest.raises(ValueError, match="does not follow"):
        context_labels("a red circle")
