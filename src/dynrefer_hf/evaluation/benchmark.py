"""Run a DynRefer model over an upstream benchmark file and score it (``dynrefer eval``; docs/evaluation.md).

`run_benchmark` predicts every region of the ground-truth file with the task's settings, writes upstream's
result file (the ground truth with ``extra_info.pred_result`` per annotation, so upstream's own scripts can
re-score it), ``metrics.json`` and a short table. Work is split into fixed batches of images; under
``torchrun`` / ``accelerate launch`` process r takes batches r, r + W, ... and writes its predictions to
``partial/rank<r>.jsonl`` as it goes. Process 0 merges them by annotation id. Because a batch is computed
the same way whichever process runs it, the metrics equal a one-process run exactly; because finished
batches are on disk, an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import time
from dataclasses import dataclass, field

from ..sharding import barrier, open_for_append, process_group, read_json_lines
from .protocols import ResultFileError, format_metrics_table, score_result
from .regions import predict_regions
from .tasks import BenchmarkTask, get_task

__all__ = ["BenchmarkRun", "OutputFolderError", "rescore_result_file", "run_benchmark"]

# upstream predicts regions in chunks of 20 (split_size, docs/upstream/model.md §16)
REGION_BATCH_SIZE = 20


@dataclass
class BenchmarkRun:
    """What `run_benchmark` produced (on process 0; other processes get ``metrics`` = {}).

    ``num_regions``: regions evaluated; ``num_resumed``: of those, predicted by an earlier run (partial results);
    ``num_predicted``: regions this process predicted; ``regions_per_second``: this process's prediction speed."""

    task: str
    metrics: dict
    result_file: str | None
    metrics_file: str | None
    num_regions: int
    num_resumed: int
    num_predicted: int
    seconds: float
    regions_per_second: float
    processes: int = 1
    table: str = ""
    extra: dict = field(default_factory=dict)


def _pred_result(prediction: dict) -> dict:
    """Upstream's ``pred_result`` of one region (docs/upstream/model.md §16: both tag sets hold the same list);
    a heads-only prediction (a task that never reads captions) has no ``caption`` and ``score``."""
    captioned = {"caption": prediction["caption"], "score": float(prediction["score"])} if "caption" in prediction else {}
    return {
        **captioned,
        "tag_set1": list(prediction["tags"]),
        "tag_set2": list(prediction["tags"]),
        "attr": [float(v) for v in prediction["attribute_scores"]],
        "cls": [float(v) for v in prediction["class_scores"]],
    }


def _read_partials(partial_dir: str) -> dict:
    """annotation id -> pred_result from every ``rank*.jsonl``."""
    done = {}
    for path in sorted(glob.glob(os.path.join(partial_dir, "rank*.jsonl"))):
        for item in read_json_lines(path):
            done[item["id"]] = item["pred_result"]
    return done


class OutputFolderError(ValueError):
    """The output folder holds the partial predictions of a run with other settings (they would be mixed)."""


def _resume(partial_dir: str, signature: dict, resume: bool, rank: int) -> None:
    """Process 0 checks that ``partial_dir`` holds predictions of a run with the same ``signature`` (or clears
    them when not resuming) and records the signature; the predictions depend on it, so resuming with other
    settings would mix two runs."""
    if rank != 0:
        return
    os.makedirs(partial_dir, exist_ok=True)
    signature_file = os.path.join(partial_dir, "run.json")
    if resume and os.path.isfile(signature_file):
        with open(signature_file, encoding="utf-8") as file:
            earlier = json.load(file)
        if earlier != signature:
            changed = sorted(key for key in signature if earlier.get(key) != signature[key])
            raise OutputFolderError(
                f"{os.path.dirname(partial_dir)} holds predictions of a run with other settings ({', '.join(changed)}); "
                "restart it (resume=False, --restart) or use another output folder"
            )
    if not resume:
        for path in glob.glob(os.path.join(partial_dir, "rank*.jsonl")):
            os.remove(path)
    with open(signature_file, "w", encoding="utf-8") as file:
        json.dump(signature, file, indent=2)


def _load(
    benchmark: BenchmarkTask, annotations, images, class_names, cache_dir, limit, rank: int, world: int
):
    """The task's dataset; process 0 builds the datasets cache, the others read it."""
    if rank == 0:
        dataset = benchmark.load(annotations, images, class_names=class_names, cache_dir=cache_dir)
    barrier(world)
    if rank != 0:
        dataset = benchmark.load(annotations, images, class_names=class_names, cache_dir=cache_dir)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset


def _plan(
    annotation_ids: list[list[int]], batch_images: int, done: dict, rank: int, world: int
) -> tuple[list[list[int]], int]:
    """The batches of record indices this process predicts, and how many regions earlier runs predicted.

    Records with regions are cut into fixed batches of ``batch_images``; process r takes batches r, r + W, ...
    that no earlier run finished, so a batch is computed the same way whichever process runs it.
    """
    with_regions = [index for index, ids in enumerate(annotation_ids) if ids]
    batches = [with_regions[i : i + batch_images] for i in range(0, len(with_regions), batch_images)]
    finished = [all(i in done for index in batch for i in annotation_ids[index]) for batch in batches]
    num_resumed = sum(
        len(annotation_ids[index]) for batch, f in zip(batches, finished) if f for index in batch
    )
    mine = [batch for number, batch in enumerate(batches) if number % world == rank and not finished[number]]
    return mine, num_resumed


def _predict(
    model,
    processor,
    dataset,
    batches,
    annotation_ids,
    partial_path: str,
    progress: str | None,
    **predict_settings,
) -> None:
    """Predict ``batches`` (lists of record indices), appending each batch's ``pred_result``s to the partial
    file; ``progress``: the title of a progress bar (None: no bar)."""
    bar = None
    if progress is not None:
        from tqdm.auto import tqdm

        total = sum(len(annotation_ids[index]) for batch in batches for index in batch)
        bar = tqdm(total=total, unit="region", desc=progress, dynamic_ncols=True)
    with open_for_append(partial_path) as partial:
        for batch in batches:
            predictions = predict_regions(
                model, processor, dataset.select(batch), batch_images=len(batch), **predict_settings
            )
            ids = [i for index in batch for i in annotation_ids[index]]
            partial.write(
                "".join(
                    json.dumps({"id": i, "pred_result": _pred_result(p)}) + "\n"
                    for i, p in zip(ids, predictions)
                )
            )
            partial.flush()
            if bar is not None:
                bar.update(len(ids))
    if bar is not None:
        bar.close()


def _merge(partial_dir: str, annotations, output_dir: str) -> tuple[dict, dict, str]:
    """The ground truth, and upstream's result file (the ground truth with every prediction of the partial
    files as ``extra_info.pred_result``), written to ``output_dir/result.json``."""
    predicted = _read_partials(partial_dir)
    with open(annotations, encoding="utf-8") as file:
        gt = json.load(file)
    result = copy.deepcopy(gt)
    for annotation in result["annotations"]:
        if annotation["id"] in predicted:
            annotation.setdefault("extra_info", {})["pred_result"] = predicted[annotation["id"]]
    result_file = os.path.join(output_dir, "result.json")
    with open(result_file, "w", encoding="utf-8") as file:
        json.dump(result, file)
    return result, gt, result_file


def run_benchmark(
    model,
    processor,
    task: str,
    annotations: str | os.PathLike,
    output_dir: str | os.PathLike,
    images: str | os.PathLike | None = None,
    *,
    limit: int | None = None,
    batch_images: int = 8,
    region_batch_size: int = REGION_BATCH_SIZE,
    tag_threshold: float | None = None,
    view_selection: str = "image_prior",
    resume: bool = True,
    progress: bool = True,
    cache_dir: str | None = None,
) -> BenchmarkRun:
    """Evaluate ``model`` on ``task`` (one of `BENCHMARK_TASKS`) over the upstream file ``annotations``.

    Args:
        images: the image folder (default: the file's ``dataset.image_root``).
        limit: evaluate only the first ``limit`` images of the file (a quick look; scored on those alone).
        batch_images: images per batch (the unit split over processes and resumed).
        region_batch_size: regions per forward pass (upstream: 20).
        tag_threshold: default: the task's (upstream eval config), else the model's ``config.tag_threshold``.
        view_selection: how views are chosen (upstream evaluates with the 3-view image prior).
        resume: reuse the predictions in ``output_dir/partial`` of an earlier, interrupted run.
    Writes ``output_dir/result.json``, ``output_dir/metrics.json`` (and ``partial/``) on process 0.
    """
    benchmark = get_task(task)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of images, got {limit}")
    if batch_images < 1:
        raise ValueError(f"batch_images must be positive, got {batch_images}")
    if tag_threshold is None:
        tag_threshold = benchmark.tag_threshold
    rank, world = process_group()
    output_dir = os.fspath(output_dir)
    partial_dir = os.path.join(output_dir, "partial")
    settings = {
        "task": task,
        "annotations": os.path.abspath(os.fspath(annotations)),
        "tag_threshold": tag_threshold,
        "view_selection": view_selection,
        "batch_images": batch_images,
        "region_batch_size": region_batch_size,
    }
    _resume(partial_dir, {**settings, "model": getattr(model.config, "_name_or_path", "")}, resume, rank)
    class_names = list(model.config.class_names)
    dataset = _load(benchmark, annotations, images, class_names, cache_dir, limit, rank, world)

    annotation_ids = dataset["annotation_ids"]
    done = _read_partials(partial_dir) if resume else {}
    mine, num_resumed = _plan(annotation_ids, batch_images, done, rank, world)
    total = sum(len(annotation_ids[index]) for batch in mine for index in batch)

    started = time.perf_counter()
    _predict(
        model,
        processor,
        dataset,
        mine,
        annotation_ids,
        os.path.join(partial_dir, f"rank{rank}.jsonl"),
        f"dynrefer eval {task}" if progress and rank == 0 else None,
        view_selection=view_selection,
        region_batch_size=region_batch_size,
        generate_captions=benchmark.reads_captions,
        **({} if tag_threshold is None else {"tag_threshold": tag_threshold}),
    )
    seconds = time.perf_counter() - started
    barrier(world)
    speed = total / seconds if seconds and total else 0.0
    if rank != 0:
        return BenchmarkRun(task, {}, None, None, 0, num_resumed, total, seconds, speed, world)

    result, gt, result_file = _merge(partial_dir, annotations, output_dir)
    evaluated = [i for ids in annotation_ids for i in ids]
    metrics = score_result(
        task,
        result,
        gt,
        result_name=result_file,
        gt_name=os.fspath(annotations),
        class_names=class_names,
        annotation_ids=evaluated if limit is not None else None,
    )
    settings_used = {
        **settings,
        "limit": limit,
        "tag_threshold": tag_threshold if tag_threshold is not None else model.config.tag_threshold,
        "generation": model.generation_config.to_diff_dict() if benchmark.reads_captions else None,
        "processes": world,
    }
    metrics_file = os.path.join(output_dir, "metrics.json")
    with open(metrics_file, "w", encoding="utf-8") as file:
        json.dump({"metrics": metrics, "settings": settings_used}, file, indent=2)
    return BenchmarkRun(
        task=task,
        metrics=metrics,
        result_file=result_file,
        metrics_file=metrics_file,
        num_regions=len(evaluated),
        num_resumed=num_resumed,
        num_predicted=total,
        seconds=seconds,
        regions_per_second=speed,
        processes=world,
        table=format_metrics_table(task, metrics),
    )


def rescore_result_file(
    task: str,
    result_file: str | os.PathLike,
    annotations: str | os.PathLike,
    class_names=None,
) -> dict:
    """Score an existing upstream-format result file (this library's or upstream's own) against ``annotations``."""
    contents = []
    for path in (result_file, annotations):
        try:
            with open(path, encoding="utf-8") as file:
                contents.append(json.load(file))
        except FileNotFoundError:
            raise FileNotFoundError(f"file not found: {path}") from None
        except json.JSONDecodeError as error:
            raise ResultFileError(f"{path} is not valid JSON ({error})") from None
    return score_result(
        task,
        contents[0],
        contents[1],
        result_name=os.fspath(result_file),
        gt_name=os.fspath(annotations),
        class_names=class_names,
    )
