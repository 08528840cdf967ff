"""Loaders of annotation files (upstream's COCO-like files, COCO detection, JSON Lines) on tiny files written here."""

import json

import numpy as np
import PIL.Image
import pycocotools.mask as mask_util
import pytest

from dynrefer_hf.data import (
    AnnotationError,
    coco_class_names,
    load_coco_detection,
    load_jsonl_regions,
    load_upstream_annotations,
    ram_tag_names,
    segmentation_box,
    upstream_vocabulary,
    validate_region_record,
)

WIDTH, HEIGHT = 64, 48


def _rle_of_box(x1, y1, x2, y2, compressed=True):
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8, order="F")
    mask[y1:y2, x1:x2] = 1
    rle = mask_util.encode(mask)
    if compressed:
        return {"size": rle["size"], "counts": rle["counts"].decode()}
    # uncompressed: run lengths in column-major order
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(np.r_[0, flat, 1 - flat[-1]]))
    counts = np.diff(np.r_[0, changes]).tolist()
    return {"size": [HEIGHT, WIDTH], "counts": counts}


def _write_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in enumerate(names):
        PIL.Image.new("RGB", (WIDTH, HEIGHT), (index * 40, 100, 150)).save(folder / name)


def _upstream_file(tmp_path, **changes):
    """Two images: a polygon region with tags and a COCO class, an RLE region (OVAD attributes), a region with
    an uncompressed RLE; image 3 has no annotation."""
    _write_images(tmp_path / "img", ["a.png", "b.png", "c.png"])
    content = {
        "dataset": {"image_root": str(tmp_path / "img")},
        "images": [
            {"id": 1, "file_name": "a.png", "width": WIDTH, "height": HEIGHT},
            {"id": 2, "file_name": "b.png", "width": WIDTH, "height": HEIGHT},
            {"id": 3, "file_name": "c.png", "width": WIDTH, "height": HEIGHT},
        ],
        "annotations": [
            {
                "id": 11,
                "image_id": 1,
                "segmentation": [[5.5, 4, 20, 4, 20, 30.25], [10, 2, 12, 3]],
                "caption": "a red ball",
                "bbox": [5.5, 2, 20, 30.25],
                "extra_info": {
                    "parser_result": {"tag_set1": [0, 2], "tag_set2": [2, 5]},
                    "coco_result": {"category": "dog"},
                    "ovad_result": {"att_vec": [1, 0, -1]},
                },
            },
            {
                "id": 12,
                "image_id": 1,
                "segmentation": _rle_of_box(30, 10, 40, 20),
                "caption": "a window",
                "extra_info": {"ovad_result": {"att_vec": [0, 1, 1]}},
            },
            {"id": 21, "image_id": 2, "segmentation": _rle_of_box(1, 2, 9, 12, compressed=False), "caption": "sky"},
        ],
        "attrs": [
            {"id": 1, "name": "texture:smooth", "type": "texture", "parent_type": "texture", "freq_set": "tail"},
            {"id": 0, "name": "color:red", "type": "color", "parent_type": "color", "freq_set": "head"},
            {"id": 2, "name": "size:big", "type": "size", "parent_type": "size", "freq_set": "medium"},
        ],
    }
    for key, value in changes.items():
        content[key] = value
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(content))
    return path, content


def test_upstream_file_becomes_region_records(tmp_path):
    path, _ = _upstream_file(tmp_path)
    dataset = load_upstream_annotations(path, cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 3 and dataset["image_id"] == [1, 2, 3]
    first = dataset[0]
    # polygon: min/max over both polygons; RLE: first and last mask column / row (inclusive)
    assert first["boxes"] == [[5.5, 2.0, 20.0, 30.25], [30.0, 10.0, 39.0, 19.0]]
    assert dataset[1]["boxes"] == [[1.0, 2.0, 8.0, 11.0]]
    assert first["captions"] == ["a window", "a red ball"][::-1]
    tags = ram_tag_names()
    assert first["tags"] == [[tags[0], tags[2], tags[5]], []]
    assert first["classes"] == [coco_class_names().index("dog"), -1]
    assert first["attributes"] == [[1, 0, -1], [0, 1, 1]]
    assert first["annotation_ids"] == [11, 12] and dataset[2]["annotation_ids"] == []
    assert first["image"].mode == "RGB" and first["image"].size == (WIDTH, HEIGHT)
    vocabulary = upstream_vocabulary(path)
    assert vocabulary.attributes == ("color:red", "texture:smooth", "size:big")  # attrs sorted by id
    validate_region_record(first, vocabulary)


def test_images_are_paths_and_a_second_build_reads_the_cache(tmp_path):
    path, _ = _upstream_file(tmp_path)
    first = load_upstream_annotations(path, cache_dir=str(tmp_path / "cache"))
    stored = first.with_format("arrow")[:1]["image"].to_pylist()[0]
    assert stored["bytes"] is None and stored["path"].endswith("a.png")  # decoded on access only
    second = load_upstream_annotations(path, cache_dir=str(tmp_path / "cache"))
    assert second.cache_files[0]["filename"] == first.cache_files[0]["filename"]
    # a changed file is a new cache entry
    _, content = _upstream_file(tmp_path)
    content["annotations"][0]["caption"] = "a blue ball"
    path.write_text(json.dumps(content))
    third = load_upstream_annotations(path, cache_dir=str(tmp_path / "cache"))
    assert third[0]["captions"][0] == "a blue ball"


def test_region_layout_and_masks(tmp_path):
    path, _ = _upstream_file(tmp_path)
    regions = load_upstream_annotations(path, layout="region", masks=True, cache_dir=str(tmp_path / "cache"))
    assert len(regions) == 3 and regions["annotation_ids"] == [[11], [12], [21]]
    assert [len(r) for r in regions["boxes"]] == [1, 1, 1]
    masks = [mask_util.decode({"size": m[0]["size"], "counts": m[0]["counts"].encode()}) for m in regions["masks"]]
    assert masks[1][10:20, 30:40].all() and masks[1].sum() == 100
    assert masks[2][2:12, 1:9].all() and masks[2].sum() == 80
    assert masks[0][4:29, 6:20].any() and masks[0].shape == (HEIGHT, WIDTH)


def test_segmentation_box_widens_degenerate_polygons_only_for_model_input():
    line = [[10, 5, 10, 20]]
    assert segmentation_box(line) == (10.0, 5.0, 10.0, 20.0)
    assert segmentation_box(line, widen=True, width=WIDTH, height=HEIGHT) == (9.0, 5.0, 10.0, 20.0)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c["annotations"][0].update(image_id=9), "annotation id 11, field 'image_id': 9 is not the id"),
        (lambda c: c["images"][1].update(file_name="missing.png"), "image id 2, field 'file_name': image file not found"),
        (
            lambda c: c["annotations"][0].update(segmentation=[[5, 4, 80, 4, 80, 30]]),
            "annotation id 11, field 'segmentation': box .* lies outside the 64x48 image",
        ),
        (
            lambda c: c["annotations"][0]["extra_info"]["parser_result"].update(tag_set2=[4585]),
            r"annotation id 11, field 'extra_info.parser_result.tag_set2': tag index 4585 is not in \[0, 4585\)",
        ),
        (
            lambda c: c["annotations"][0]["extra_info"]["coco_result"].update(category="dragon"),
            "annotation id 11, field 'extra_info.coco_result.category': 'dragon'",
        ),
        (
            lambda c: c["annotations"][1]["extra_info"]["ovad_result"].update(att_vec=[1, 0]),
            "annotation id 12, field 'extra_info.ovad_result.att_vec': must hold 3 labels",
        ),
        (lambda c: c["annotations"][2].update(id=11), "annotation id 11, field 'id': is used twice"),
        (lambda c: c["annotations"][2].pop("segmentation"), "annotation id 21, field 'segmentation'"),
        (lambda c: c["images"][0].pop("width"), r"images\[0\], field 'width': is missing"),
    ],
)
def test_bad_upstream_files_name_file_record_and_field(tmp_path, change, message):
    path, content = _upstream_file(tmp_path)
    change(content)
    path.write_text(json.dumps(content))
    with pytest.raises(AnnotationError, match=message) as caught:
        load_upstream_annotations(path, cache_dir=str(tmp_path / "cache"))
    assert str(caught.value).startswith(str(path))


def test_coco_detection_file(tmp_path):
    _write_images(tmp_path / "img", ["a.png", "b.png"])
    content = {
        "images": [
            {"id": 7, "file_name": "a.png", "width": WIDTH, "height": HEIGHT},
            {"id": 8, "file_name": "b.png", "width": WIDTH, "height": HEIGHT},
        ],
        "annotations": [
            {"id": 1, "image_id": 7, "bbox": [2, 3, 10, 20], "category_id": 5, "caption": "a kettle"},
            {"id": 2, "image_id": 7, "bbox": [20, 3, 10.5, 20], "category_id": 3},
            {"id": 3, "image_id": 8, "bbox": [0, 0, 64, 48], "category_id": 3, "tags": ["wall"]},
        ],
        "categories": [{"id": 5, "name": "kettle"}, {"id": 3, "name": "window"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(content))
    dataset = load_coco_detection(path, tmp_path / "img", cache_dir=str(tmp_path / "cache"))
    assert dataset.features["classes"].feature.names == ["window", "kettle"]  # sorted by category id
    assert dataset[0]["boxes"] == [[2.0, 3.0, 12.0, 23.0], [20.0, 3.0, 30.5, 23.0]]
    assert dataset[0]["classes"] == [1, 0] and dataset[0]["captions"] == ["a kettle", ""]
    assert dataset[1]["tags"] == [["wall"]] and dataset[1]["annotation_ids"] == [3]
    regions = load_coco_detection(path, tmp_path / "img", layout="region", cache_dir=str(tmp_path / "cache"))
    assert len(regions) == 3
    content["annotations"][2]["bbox"] = [1, 0, 64, 48]
    path.write_text(json.dumps(content))
    with pytest.raises(AnnotationError, match="annotation id 3, field 'bbox': box .* outside the 64x48 image"):
        load_coco_detection(path, tmp_path / "img", cache_dir=str(tmp_path / "cache"))
    content["annotations"][2]["bbox"] = [1, 0, 6, 4]
    content["annotations"][2]["category_id"] = 99
    path.write_text(json.dumps(content))
    with pytest.raises(AnnotationError, match="annotation id 3, field 'category_id': 99"):
        load_coco_detection(path, tmp_path / "img", cache_dir=str(tmp_path / "cache"))


def test_jsonl_file(tmp_path):
    _write_images(tmp_path, ["a.png", "b.png"])
    lines = [
        {"image": "a.png", "boxes": [[1, 2, 30, 40], [5, 5, 9, 9]], "captions": ["a cat", "an ear"], "classes": ["cat", None]},
        {"image": "b.png", "boxes": [[0, 0, 64, 48]], "tags": [["sky", "blue"]], "classes": ["sky"], "image_id": 42},
    ]
    path = tmp_path / "regions.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    dataset = load_jsonl_regions(path, cache_dir=str(tmp_path / "cache"))
    assert dataset.features["classes"].feature.names == ["cat", "sky"]
    assert dataset["image_id"] == [1, 42] and dataset["annotation_ids"] == [[0, 1], [2]]
    assert dataset[0]["classes"] == [0, -1] and dataset[1]["captions"] == [""] and dataset[1]["tags"] == [["sky", "blue"]]
    lines[1]["boxes"] = [[0, 0, 65, 48]]
    path.write_text("\n".join(json.dumps(line) for line in lines))
    with pytest.raises(AnnotationError, match=r"line 2, field 'boxes\[0\]': box .* outside the 64x48 image"):
        load_jsonl_regions(path, cache_dir=str(tmp_path / "cache"))
    lines[1]["boxes"] = [[0, 0, 6, 4]]
    lines[1]["captions"] = ["a", "b"]
    path.write_text("\n".join(json.dumps(line) for line in lines))
    with pytest.raises(AnnotationError, match="line 2, field 'captions': must be a list with one entry per box"):
        load_jsonl_regions(path, cache_dir=str(tmp_path / "cache"))
    lines[1].pop("captions")
    lines[0]["image"] = "nope.png"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    with pytest.raises(AnnotationError, match="line 1, field 'image': image file not found"):
        load_jsonl_regions(path, cache_dir=str(tmp_path / "cache"))


def test_classes_in_other_names_can_be_left_unread(tmp_path):
    path, content = _upstream_file(tmp_path)
    content["annotations"][0]["extra_info"]["coco_result"]["category"] = "teapot"
    path.write_text(json.dumps(content))
    dataset = load_upstream_annotations(path, read_classes=False, cache_dir=str(tmp_path / "cache"))
    assert dataset[0]["classes"] == [-1, -1]
    named = load_upstream_annotations(path, class_names=["cup", "teapot"], cache_dir=str(tmp_path / "cache"))
    assert named.features["classes"].feature.names == ["cup", "teapot"] and named[0]["classes"] == [1, -1]
