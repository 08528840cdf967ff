"""Batch jobs (`dynrefer_hf.batch`, ``dynrefer caption --input/--output``): reading region files, lines equal
to the pipeline called alone on each image, resuming after a torn write and after SIGKILL, two processes
(torchrun, gloo) equal to one."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
from launch import run_command
from transformers import pipeline

from dynrefer_hf.batch import RegionRequest, describe_dataset, read_region_requests, requests_from_images
from dynrefer_hf.cli import main

NUM_IMAGES = 6


def _write_images(folder, count, seed=0):
    rng = np.random.default_rng(seed)
    names = []
    for index in range(count):
        size = (40 + 8 * (index % 3), 32 + 4 * index)  # sizes differ, so boxes' views differ
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        name = f"image{index:03d}.png"
        PIL.Image.fromarray(pixels).save(folder / name)
        names.append(name)
    return names


def _region_lines(names, count_regions=lambda index: 1 + index % 3):
    lines = []
    for index, name in enumerate(names):
        boxes = [[2 + region, 3, 20 + 2 * region, 25 + index] for region in range(count_regions(index))]
        line = {"image": name, "boxes": boxes}
        if index % 2:
            line["controls"] = "red"
        lines.append(line)
    return lines


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch")
    names = _write_images(folder, NUM_IMAGES)
    lines = _region_lines(names)
    (folder / "regions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder, lines


@pytest.fixture(scope="module")
def describe(tiny_region_captioner):
    return pipeline("region-captioning", model=str(tiny_region_captioner), device="cpu")


def _reference(describe, folder, lines):
    """The pipeline called alone on each image: what every batch line must hold."""
    return [
        {
            "image": line["image"],
            "regions": describe(str(folder / line["image"]), boxes=line["boxes"], controls=line.get("controls")),
        }
        for line in lines
    ]


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_requests_keep_images_boxes_and_controls_in_order(job):
    folder, lines = job
    requests = read_region_requests(folder / "regions.jsonl")
    assert [request.key for request in requests] == [line["image"] for line in lines]
    assert [request.image for request in requests] == [os.path.join(folder, line["image"]) for line in lines]
    assert [request.boxes for request in requests] == [line["boxes"] for line in lines]
    assert [request.controls for request in requests] == [line.get("controls") for line in lines]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"image": "a.png", "boxes": [[1, 2, 3]]}\n', "boxes"),
        ('{"image": "a.png", "boxes": [[1, 2, 3, 4]], "colour": 1}\n', "colour"),
        ('{"boxes": [[1, 2, 3, 4]]}\n', "image"),
        ("not json\n", "not valid JSON"),
    ],
)
def test_a_bad_jsonl_line_is_refused_naming_line_and_field(tmp_path, content, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"line 1.*{problem}"):
        read_region_requests(path)


def test_coco_and_datasets_inputs_give_the_same_requests(job, tmp_path):
    import datasets

    folder, lines = job
    images, annotations = [], []
    for image_id, line in enumerate(lines, start=1):
        with PIL.Image.open(folder / line["image"]) as image:
            width, height = image.size
        images.append({"id": image_id, "file_name": line["image"], "width": width, "height": height})
        for x1, y1, x2, y2 in line["boxes"]:
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "bbox": [x1, y1, x2 - x1, y2 - y1], "category_id": 1}
            )
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    from_coco = read_region_requests(tmp_path / "coco.json", images=folder)
    assert [(r.key, r.boxes) for r in from_coco] == [(line["image"], line["boxes"]) for line in lines]

    table = datasets.Dataset.from_dict(
        {
            "image": [str(folder / line["image"]) for line in lines],
            "boxes": [line["boxes"] for line in lines],
            "image_id": list(range(100, 100 + len(lines))),
        }
    ).cast_column("image", datasets.Image())
    table.save_to_disk(tmp_path / "saved")
    from_disk = read_region_requests(tmp_path / "saved")
    assert [(r.key, r.boxes) for r in from_disk] == [(100 + i, line["boxes"]) for i, line in enumerate(lines)]
    first = from_disk[0].pipeline_input()["image"]
    assert np.array_equal(np.asarray(first), np.asarray(PIL.Image.open(folder / lines[0]["image"]).convert("RGB")))


def test_describe_dataset_lines_equal_the_pipeline_on_each_image_and_are_written(job, describe, tmp_path):
    folder, lines = job
    requests = read_region_requests(folder / "regions.jsonl")
    output = tmp_path / "out.jsonl"
    yielded = list(describe_dataset(describe, requests, output=output, progress=False))
    expected = _reference(describe, folder, lines)
    assert yielded == expected
    assert _read(output) == json.loads(json.dumps(expected))


def test_resume_after_a_torn_write_gives_the_uninterrupted_file(job, describe, tmp_path):
    folder, _ = job
    requests = read_region_requests(folder / "regions.jsonl")
    whole = tmp_path / "whole.jsonl"
    list(describe_dataset(describe, requests, output=whole, progress=False))
    content = whole.read_text()
    kept = content.splitlines(keepends=True)
    stopped = tmp_path / "stopped.jsonl"
    stopped.write_text("".join(kept[:2]) + kept[2][: len(kept[2]) // 2])  # killed while writing line 3
    calls = []

    def counting(inputs, **kwargs):
        inputs = list(inputs)
        calls.extend(item["image"] for item in inputs)
        return describe((item for item in inputs), **kwargs)

    resumed = list(describe_dataset(counting, requests, output=stopped, progress=False))
    assert stopped.read_text() == content
    assert calls == [request.image for request in requests[2:]]  # nothing twice
    assert resumed == [json.loads(line) for line in kept]  # the iterator also gives the earlier lines


def test_resuming_another_jobs_output_is_refused(job, describe, tmp_path):
    folder, _ = job
    requests = read_region_requests(folder / "regions.jsonl")
    output = tmp_path / "other.jsonl"
    output.write_text(json.dumps({"image": "elsewhere.png", "regions": []}) + "\n")
    with pytest.raises(ValueError, match="another job's output"):
        list(describe_dataset(describe, requests, output=output, progress=False))
    assert len(list(describe_dataset(describe, requests, output=output, restart=True, progress=False))) == len(requests)


def test_boxes_apply_to_every_image():
    requests = requests_from_images(["a.png", "b.png"], [[1, 2, 3, 4]], controls="red")
    assert requests == [
        RegionRequest("a.png", "a.png", [[1, 2, 3, 4]], "red"),
        RegionRequest("b.png", "b.png", [[1, 2, 3, 4]], "red"),
    ]


def test_cli_several_images_print_one_line_per_image(job, tiny_region_captioner, describe, capsys):
    folder, _ = job
    paths = [str(folder / "image000.png"), str(folder / "image001.png")]
    code = main(["caption", *paths, "--box", "1,2,20,25", "--model", str(tiny_region_captioner), "--device", "cpu"])
    assert code == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = [{"image": path, "regions": describe(path, boxes=[[1, 2, 20, 25]], attribute_top_k=3)} for path in paths]
    assert printed == json.loads(json.dumps(expected))


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--input", "regions.jsonl", "--box", "1,2,3,4"], "drop IMAGE, --box and --controls"),
        (["a.png", "b.png"], "no regions given"),
        (["--input", "missing.jsonl"], "--input missing.jsonl: region file not found"),
        (["a.png", "--box", "1,2,3,4", "--restart"], "--restart needs --output"),
        (["a.png", "--box", "1,2,3,4", "--output", "o.jsonl", "--draw", "x.png"], "--draw draws one image"),
    ],
)
def test_cli_batch_mistakes_are_one_line_and_exit_2(arguments, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["caption", *arguments]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- real processes, real kills


def _environment():
    tests = os.path.dirname(__file__)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    environment["PYTHONPATH"] = os.pathsep.join([tests, environment.get("PYTHONPATH", "")])
    return environment


def _caption_command(model, regions, output):
    return ["-m", "dynrefer_hf.cli", "caption", "--input", str(regions), "--output", str(output), "--model", str(model), "--device", "cpu"]


@pytest.fixture(scope="module")
def long_job(tmp_path_factory, tiny_region_captioner):
    """A 40-image job and its uninterrupted output (one process)."""
    folder = tmp_path_factory.mktemp("long_job")
    names = _write_images(folder, 40, seed=1)
    lines = _region_lines(names, count_regions=lambda index: 2 + index % 4)
    regions = folder / "regions.jsonl"
    regions.write_text("".join(json.dumps(line) + "\n" for line in lines))
    whole = folder / "whole.jsonl"
    completed = run_command(
        [sys.executable, *_caption_command(tiny_region_captioner, regions, whole)], env=_environment(), timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert len(whole.read_text().splitlines()) == len(lines)
    return regions, whole


@pytest.mark.slow
def test_a_job_killed_with_sigkill_and_resumed_writes_the_uninterrupted_file(long_job, tiny_region_captioner, tmp_path):
    regions, whole = long_job
    output = tmp_path / "killed.jsonl"
    command = [sys.executable, *_caption_command(tiny_region_captioner, regions, output)]
    process = subprocess.Popen(
        command, env=_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            if output.exists() and output.read_text().count("\n") >= 3:
                break
            time.sleep(0.01)
        assert process.poll() is None, "the job ended before it could be killed; give it more images"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    written = output.read_text().count("\n")
    assert 3 <= written < len(whole.read_text().splitlines())
    completed = run_command(command, env=_environment(), timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert output.read_text() == whole.read_text()


@pytest.mark.slow
def test_two_processes_under_torchrun_write_the_one_process_file(long_job, tiny_region_captioner, tmp_path):
    regions, whole = long_job
    output = tmp_path / "two.jsonl"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    completed = run_command(
        [*launcher, *_caption_command(tiny_region_captioner, regions, output)],
        env=_environment(),
        timeout=300,
        retries_on_hang=1,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert output.read_text() == whole.read_text()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["two.jsonl"]  # the part files are gone
