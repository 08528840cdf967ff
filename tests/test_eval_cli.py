"""`dynrefer eval` end to end with the embedded demonstration model on shapes scenes exported to upstream's format:
the result file, the metrics against `evaluate_regions`, re-scoring, resuming, two processes (gloo), errors."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from launch import run_command
from transformers import AutoModel, AutoProcessor

import dynrefer_hf  # noqa: F401  (registers the Auto classes)
from dynrefer_hf.cli import main
from dynrefer_hf.data import load_upstream_annotations
from dynrefer_hf.evaluation import (
    BENCHMARK_TASKS,
    BenchmarkTask,
    evaluate_regions,
    register_task,
    run_benchmark,
)
from dynrefer_hf.pretrained import SHAPES_DEMO_PATH
from dynrefer_hf.shapes import export_shapes_upstream

NUM_SCENES = 3  # 3 scenes: 16 regions


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes_upstream")
    return {
        "regions": export_shapes_upstream(folder / "regions", NUM_SCENES, one_region_per_image=True),
        "images": export_shapes_upstream(folder / "images", NUM_SCENES),
    }


@pytest.fixture(scope="module")
def demo():
    return AutoModel.from_pretrained(SHAPES_DEMO_PATH), AutoProcessor.from_pretrained(SHAPES_DEMO_PATH)


def _eval(capsys, *arguments):
    code = main(["eval", *arguments])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_refcocog_protocol_end_to_end_equals_evaluate_regions(exported, demo, tmp_path, capsys):
    output = tmp_path / "refcocog"
    code, out, err = _eval(
        capsys, "--task", "refcocog", "--annotations", exported["regions"], "--output", str(output),
        "--tag-threshold", "model", "--dtype", "float32",  # the reference below runs the float32 model
    )
    assert code == 0, err
    assert "| refcocog |" in out and "regions/s" in out
    metrics = json.loads((output / "metrics.json").read_text())["metrics"]
    assert set(metrics) >= {"METEOR", "CIDEr", "Bleu_4", "ROUGE_L"} and metrics["agg_metrics"] == metrics["METEOR"]

    # upstream's result file: the ground truth plus pred_result on every annotation
    gt = json.loads(Path(exported["regions"]).read_text())
    result = json.loads((output / "result.json").read_text())
    assert [a["id"] for a in result["annotations"]] == [a["id"] for a in gt["annotations"]]
    prediction = result["annotations"][0]["extra_info"]["pred_result"]
    model, processor = demo
    assert set(prediction) == {"caption", "score", "tag_set1", "tag_set2", "attr", "cls"}
    assert len(prediction["attr"]) == model.config.num_attributes and len(prediction["cls"]) == model.config.num_classes

    # the same regions through evaluate_regions (one region per record, same batches and views)
    regions = load_upstream_annotations(exported["regions"], class_names=model.config.class_names)
    reference = evaluate_regions(
        model, processor, regions, batch_images=8, region_batch_size=20, view_selection="image_prior"
    )
    assert metrics["CIDEr"] == pytest.approx(reference.percentages()["cider_d"], rel=1e-12)
    assert [a["extra_info"]["pred_result"]["caption"] for a in result["annotations"]] == [
        p["caption"] for p in reference.predictions
    ]


def _exact_captions(result, gt, scoring):
    """A toy protocol: the percentage of regions whose predicted caption is their ground-truth caption."""
    truth = {annotation["id"]: annotation["caption"] for annotation in gt["annotations"]}
    scored = [
        annotation for annotation in result["annotations"]
        if scoring.annotation_ids is None or annotation["id"] in scoring.annotation_ids
    ]
    predicted = [(a.get("extra_info") or {}).get("pred_result", {}).get("caption") for a in scored]  # None: none
    exact = sum(caption == truth[a["id"]] for caption, a in zip(predicted, scored))
    return {"exact": 100 * exact / len(scored), "num_regions": len(scored), "agg_metrics": exact / len(scored)}


def test_a_registered_task_runs_end_to_end(exported, demo, tmp_path, capsys):
    # docs/evaluation.md, "Adding a task": one record plus its scorer
    register_task(BenchmarkTask("exact-captions", "toy: exact captions (%)", _exact_captions, ("exact",)))
    try:
        model, processor = demo
        run = run_benchmark(
            model, processor, "exact-captions", exported["regions"], tmp_path / "run", limit=2, progress=False
        )
        result = json.loads((tmp_path / "run" / "result.json").read_text())
        scored = [a for a in result["annotations"] if "pred_result" in a.get("extra_info", {})]
        exact = sum(a["extra_info"]["pred_result"]["caption"] == a["caption"] for a in scored)
        assert len(scored) == run.metrics["num_regions"] == 2  # one region per image, two images
        assert run.metrics["exact"] == pytest.approx(100 * exact / 2)
        assert run.table.splitlines()[0].split() == ["|", "task", "|", "exact", "|"]
        # `dynrefer eval` offers it and re-scores with it like any task: every annotation of the file, so the
        # regions past --limit count as not exact
        code, out, err = _eval(capsys, "--task", "exact-captions", "--rescore", run.result_file,
                               "--annotations", exported["regions"], "--json")
        assert code == 0, err
        assert json.loads(out)["exact"] == pytest.approx(100 * exact / len(result["annotations"]))
    finally:
        del BENCHMARK_TASKS["exact-captions"]


@pytest.mark.slow
def test_dense_captioning_and_region_captioning_layouts(exported, tmp_path, capsys):
    code, _, err = _eval(
        capsys, "--task", "vg-densecap", "--annotations", exported["images"], "--output", str(tmp_path / "dense"),
        "--limit", "2",
    )
    assert code == 0, err
    metrics = json.loads((tmp_path / "dense" / "metrics.json").read_text())["metrics"]
    # ground-truth boxes in, so detection is perfect; captions are mostly right
    assert metrics["detmap"] == 100.0 and 50 < metrics["map"] <= 100 and metrics["num_images"] == 2
    # several regions per image id: the region-captioning protocol refuses it in one line
    code, _, err = _eval(capsys, "--task", "refcocog", "--rescore", str(tmp_path / "dense" / "result.json"),
                         "--annotations", exported["images"])
    assert code == 2 and "exactly one annotation per image id" in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def ovad_one_process(exported, tmp_path_factory):
    """One process with one thread, as each process of the two-process run (OMP_NUM_THREADS=1): the same
    batches on the same number of threads give bit-identical predictions."""
    import torch

    output = tmp_path_factory.mktemp("ovad_one")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["eval", "--task", "ovad", "--annotations", exported["images"], "--output", str(output),
                     "--batch-images", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    return output


@pytest.mark.slow
def test_rescore_and_resume(exported, ovad_one_process, tmp_path, capsys):
    metrics = json.loads((ovad_one_process / "metrics.json").read_text())["metrics"]
    assert 0 < metrics["ap/all"] <= 100 and {"ap/head", "ap/medium", "ap/tail"} <= set(metrics)
    # the means per parent type, weighted by their attributes with a positive, average back to ap/all
    with open(exported["images"]) as file:
        gt = json.load(file)
    types = [attr["parent_type"] for attr in sorted(gt["attrs"], key=lambda attr: attr["id"])]
    vectors = [annotation["extra_info"]["ovad_result"]["att_vec"] for annotation in gt["annotations"]]
    positive = [any(vector[i] == 1 for vector in vectors) for i in range(len(types))]
    counts = {name: sum(p for t, p in zip(types, positive) if t == name) for name in dict.fromkeys(types)}
    reported = sorted(key for key in metrics if key.startswith("ap/type/"))
    assert reported == sorted(f"ap/type/{t}" for t in counts)
    weighted = sum(counts[t] * metrics[f"ap/type/{t}"] for t in counts if counts[t]) / sum(counts.values())
    assert weighted == pytest.approx(metrics["ap/all"], rel=1e-9)
    code, out, err = _eval(capsys, "--task", "ovad", "--rescore", str(ovad_one_process / "result.json"),
                           "--annotations", exported["images"], "--json")
    assert code == 0, err
    assert json.loads(out) == metrics

    # an interrupted run: the last scene's predictions are lost (plus a torn line); the rerun redoes only those
    run = tmp_path / "interrupted"
    shutil.copytree(ovad_one_process, run)
    partial = run / "partial" / "rank0.jsonl"
    lines = partial.read_text().splitlines(keepends=True)
    annotations = json.loads(Path(exported["images"]).read_text())["annotations"]
    last_scene = sum(1 for a in annotations if a["image_id"] == NUM_SCENES)  # one batch per image
    partial.write_text("".join(lines[:-last_scene]) + '{"id": 3, "pred')
    code, out, err = _eval(capsys, "--task", "ovad", "--annotations", exported["images"], "--output",
                           str(run), "--batch-images", "1")
    assert code == 0, err
    resumed = len(lines) - last_scene
    assert f"({resumed} from an earlier run)" in out
    assert json.loads((run / "metrics.json").read_text())["metrics"] == pytest.approx(metrics, rel=1e-6)
    # other settings in the same folder: refused, not mixed
    code, out, err = _eval(capsys, "--task", "coco", "--annotations", exported["images"], "--output", str(run))
    assert code == 2 and "other settings (batch_images, task)" in err


@pytest.mark.slow
def test_two_processes_give_the_one_process_metrics(exported, ovad_one_process, tmp_path):
    output = tmp_path / "ovad_two"
    environment = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "dynrefer_hf.cli", "eval", "--task", "ovad", "--annotations", exported["images"],
        "--output", str(output), "--batch-images", "1",
    ]
    completed = run_command(command, env=environment, timeout=300, retries_on_hang=1)
    stdout, stderr = completed.stdout, completed.stderr
    assert completed.returncode == 0, stderr[-4000:]
    assert stdout.count("| ovad |") == 1  # only process 0 reports
    assert sorted(p.name for p in (output / "partial").glob("rank*.jsonl")) == ["rank0.jsonl", "rank1.jsonl"]
    two = json.loads((output / "metrics.json").read_text())
    one = json.loads((ovad_one_process / "metrics.json").read_text())
    assert two["metrics"] == one["metrics"] and two["settings"]["processes"] == 2
    # every prediction is the same, bit for bit
    result_two = json.loads((output / "result.json").read_text())
    result_one = json.loads((ovad_one_process / "result.json").read_text())
    assert result_two == result_one


def test_user_errors_are_one_line(exported, tmp_path, capsys):
    code, _, err = _eval(capsys, "--task", "coco", "--annotations", str(tmp_path / "none.json"), "--output", "x")
    assert code == 2 and "file not found" in err and len(err.strip().splitlines()) == 1
    code, _, err = _eval(capsys, "--task", "coco", "--annotations", exported["images"])
    assert code == 2 and "--output DIR is required" in err
    broken = tmp_path / "broken.json"
    content = json.loads(Path(exported["images"]).read_text())
    content["annotations"][0]["segmentation"] = [[0, 0, 9999, 0, 9999, 10]]
    broken.write_text(json.dumps(content))
    code, _, err = _eval(capsys, "--task", "coco", "--annotations", str(broken), "--output", str(tmp_path / "o"))
    assert code == 2 and "annotation id 1, field 'segmentation'" in err and "outside" in err


@pytest.mark.slow
def test_finetune_example_reads_an_upstream_annotation_file(exported, tmp_path, monkeypatch):
    import runpy
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "finetune.py"
    monkeypatch.setattr(sys, "argv", [
        str(example), "--tiny", "--dataset", exported["images"], "--max-steps", "1", "--batch-size", "4",
        "--output-dir", str(tmp_path / "ft"),
    ])
    runpy.run_path(str(example), run_name="__main__")
    assert (tmp_path / "ft" / "model.safetensors").is_file()


def _notice_and_error(err: str) -> str:
    """The error line, after the demonstration-model notice (and the loading bars and the precision line)."""
    lines = [line for line in err.strip().splitlines() if not line.startswith("dynrefer: precision ")]
    assert lines[0].startswith("dynrefer: note: using the demonstration model") and "not the paper's model" in lines[0]
    assert lines[-1].startswith("dynrefer eval: ") and sum(line.startswith("dynrefer") for line in lines) == 2, err
    return lines[-1]


def test_a_field_the_protocol_scores_is_checked_when_the_file_is_loaded(exported, tmp_path, capsys):
    content = json.loads(Path(exported["regions"]).read_text())
    renamed = content["annotations"][2]
    renamed["captions"] = [renamed.pop("caption")]
    broken = tmp_path / "captions.json"
    broken.write_text(json.dumps(content))
    output = tmp_path / "refcocog"
    code, _, err = _eval(capsys, "--task", "refcocog", "--annotations", str(broken), "--output", str(output))
    error = _notice_and_error(err)
    assert code == 2
    assert f"{broken}: annotation id {renamed['id']}, field 'caption': is missing" in error and "captions" in error
    assert not list((output / "partial").glob("rank*.jsonl"))  # refused before the model ran
    # re-scoring against such a ground truth names the same record and field
    code, _, err = _eval(capsys, "--task", "refcocog", "--rescore", exported["regions"], "--annotations", str(broken))
    assert code == 2 and f"annotation id {renamed['id']}, field 'caption': missing" in err

    # the recognition protocol's field, likewise
    content = json.loads(Path(exported["images"]).read_text())
    unlabelled = content["annotations"][0]
    del unlabelled["extra_info"]["coco_result"]
    broken.write_text(json.dumps(content))
    code, _, err = _eval(capsys, "--task", "coco", "--annotations", str(broken), "--output", str(tmp_path / "coco"),
                         "--quiet")
    assert code == 2 and "dynrefer: note:" not in err
    assert f"annotation id {unlabelled['id']}, field 'extra_info.coco_result.category': is missing" in err


def test_an_internal_error_is_not_reported_as_the_users(exported, ovad_one_process, capsys, monkeypatch):
    from dynrefer_hf.evaluation import benchmark

    def slip(*args, **kwargs):
        raise ValueError("an internal slip")

    monkeypatch.setattr(benchmark, "score_result", slip)
    code, _, err = _eval(capsys, "--task", "ovad", "--rescore", str(ovad_one_process / "result.json"),
                         "--annotations", exported["images"])
    assert code == 1 and "Traceback" in err and "an internal error stopped the command" in err


def test_rescore_writes_metrics_json_into_output(exported, ovad_one_process, tmp_path, capsys):
    output = tmp_path / "rescored"
    code, out, err = _eval(capsys, "--task", "ovad", "--rescore", str(ovad_one_process / "result.json"),
                           "--annotations", exported["images"], "--output", str(output))
    assert code == 0, err
    written = json.loads((output / "metrics.json").read_text())
    assert written["metrics"] == json.loads((ovad_one_process / "metrics.json").read_text())["metrics"]
    assert written["settings"]["rescored"] == str(ovad_one_process / "result.json")
    assert f"wrote {output / 'metrics.json'}" in out


def test_tasks_that_never_read_captions_run_heads_only(exported, demo, tmp_path, monkeypatch):
    """OVAD and COCO score attributes and classes only: `run_benchmark` runs no language model for them, and
    the scores it writes equal those of the full (captioning) path."""
    from dynrefer_hf.evaluation import predict_regions

    model, processor = demo
    dataset = load_upstream_annotations(exported["images"], class_names=list(model.config.class_names))
    full = predict_regions(model, processor, dataset, batch_images=1, tag_threshold=None)
    assert not BENCHMARK_TASKS["ovad"].reads_captions and not BENCHMARK_TASKS["coco"].reads_captions

    def no_language_model(*args, **kwargs):
        raise AssertionError("the language model ran for a task that never reads captions")

    monkeypatch.setattr(model.language_model, "forward", no_language_model)
    monkeypatch.setattr(model.language_model, "generate", no_language_model)
    run_benchmark(model, processor, "ovad", exported["images"], tmp_path / "ovad", batch_images=1, progress=False,
                  tag_threshold=None)
    result = json.loads((tmp_path / "ovad" / "result.json").read_text())
    predicted = [a["extra_info"]["pred_result"] for a in result["annotations"]]
    assert len(predicted) == len(full)
    for written, reference in zip(predicted, full):
        assert "caption" not in written and "score" not in written
        assert written["attr"] == pytest.approx(reference["attribute_scores"], abs=1e-6)
        assert written["cls"] == pytest.approx(reference["class_scores"], abs=1e-6)
        assert written["tag_set1"] == reference["tags"]
    with pytest.raises(ValueError, match="generation settings \\['num_beams'\\]"):
        predict_regions(model, processor, dataset, generate_captions=False, num_beams=2)
