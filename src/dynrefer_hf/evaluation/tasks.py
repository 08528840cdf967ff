"""The paper's benchmarks, one declarative record each (docs/upstream/evaluation.md §1, §3-§6).

A `BenchmarkTask` says how a task's ground-truth file is loaded, how its regions are predicted (the settings of
upstream's eval config), how a result file is scored and which metrics its table shows. Adding a task is one
record, given to `register_task`, plus its scorer (docs/evaluation.md, "Adding a task").

Kept free of heavy imports: ``dynrefer eval --help`` lists the tasks without loading torch, so loaders and
scorers may be named ``"module:function"`` and are imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BENCHMARK_TASKS", "BenchmarkTask", "Scoring", "get_task", "register_task"]


@dataclass(frozen=True)
class Scoring:
    """What a scorer knows besides the two files' contents.

    ``class_names``: the names ``pred_result.cls`` scores, in order (None: the 80 COCO names);
    ``annotation_ids``: score only these annotations (a partial run, ``--limit``); None: every annotation.
    """

    result_name: str = "result file"
    gt_name: str = "ground-truth file"
    class_names: Sequence[str] | None = None
    annotation_ids: frozenset | None = None


@dataclass(frozen=True)
class BenchmarkTask:
    """One benchmark.

    Attributes:
        name: the ``--task`` value.
        description: one line for ``dynrefer eval --help``.
        scorer: ``scorer(result, gt, scoring: Scoring) -> metrics`` on the contents of an upstream result file
            and its ground-truth file (or ``"module:function"`` naming it). Metrics are x 100 as the paper
            prints them, with upstream's own ``agg_metrics``; a file the protocol cannot score raises
            ``protocols.ResultFileError`` naming the file, record and field.
        headline: the metrics the table shows, in order (those present in the metrics).
        tag_threshold: the eval config's tag threshold; None: the model's own ``config.tag_threshold``.
        upstream_config: upstream's eval config the settings come from.
        loader: ``loader(annotations, images, *, class_names, cache_dir, **loader_options)`` -> a dataset of
            region records (docs/data.md), or ``"module:function"``; default: upstream's annotation files.
        loader_options: extra keyword arguments of the loader (COCO reads the regions' class labels).
        reads_captions: whether the scorer reads the captions; a task whose protocol never does (OVAD, COCO)
            is predicted heads-only, without running the language model.
    """

    name: str
    description: str
    scorer: Callable[..., dict] | str
    headline: tuple[str, ...]
    tag_threshold: float | None = None
    upstream_config: str = ""
    loader: Callable[..., Any] | str = "dynrefer_hf.data.upstream:load_upstream_annotations"
    loader_options: Mapping[str, Any] = field(default_factory=dict)
    reads_captions: bool = True

    def score(self, result: dict, gt: dict, scoring: Scoring) -> dict:
        return _resolve(self.scorer)(result, gt, scoring)

    def load(self, annotations, images, *, class_names, cache_dir):
        return _resolve(self.loader)(
            annotations, images, class_names=class_names, cache_dir=cache_dir, **self.loader_options
        )


def _resolve(function: Callable | str) -> Callable:
    if callable(function):
        return function
    module_name, _, attribute = function.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


BENCHMARK_TASKS: dict[str, BenchmarkTask] = {}


def register_task(task: BenchmarkTask) -> BenchmarkTask:
    """Add ``task`` to `BENCHMARK_TASKS` (``dynrefer eval --task`` and `run_benchmark` accept it)."""
    if not isinstance(task, BenchmarkTask):
        raise TypeError(f"task must be a BenchmarkTask, got {type(task).__name__}")
    if task.name in BENCHMARK_TASKS:
        raise ValueError(f"a benchmark task named {task.name!r} is registered already")
    if not task.headline:
        raise ValueError(f"benchmark task {task.name!r} names no headline metric")
    BENCHMARK_TASKS[task.name] = task
    return task


def get_task(name: str) -> BenchmarkTask:
    """The registered task called ``name``; ``ValueError`` naming the choices otherwise."""
    if name not in BENCHMARK_TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(BENCHMARK_TASKS)}")
    return BENCHMARK_TASKS[name]


_PROTOCOLS = "dynrefer_hf.evaluation.protocols"
_CAPTION_METRICS = ("METEOR", "CIDEr", "Bleu_4", "ROUGE_L")
# the loader checks, on every annotation, the ground-truth fields the task's scorer reads
_CAPTIONS = {"required_fields": ("caption",)}

register_task(BenchmarkTask(
    "refcocog", "RefCOCOg region captioning: METEOR, CIDEr (§3)", f"{_PROTOCOLS}:score_captioning",
    _CAPTION_METRICS, tag_threshold=0.76, upstream_config="configs/eval/refcoco/refcocog_reg.yaml",
    loader_options=_CAPTIONS,
))  # fmt: skip
register_task(BenchmarkTask(
    "vg-reg", "Visual Genome region captioning: METEOR, CIDEr (§3)", f"{_PROTOCOLS}:score_captioning",
    _CAPTION_METRICS, tag_threshold=0.8, upstream_config="configs/eval/vg/vg_reg.yaml", loader_options=_CAPTIONS,
))  # fmt: skip
register_task(BenchmarkTask(
    "vg-densecap", "Visual Genome dense captioning with ground-truth boxes: mAP (§4)", f"{_PROTOCOLS}:score_densecap",
    ("map", "detmap"), upstream_config="configs/eval/vg/vg1.2_densecap.yaml", loader_options=_CAPTIONS,
))  # fmt: skip
register_task(BenchmarkTask(
    "ovad", "OVAD attribute detection, box oracle: mAP (§5)", f"{_PROTOCOLS}:score_ovad",
    ("ap/all", "ap/head", "ap/medium", "ap/tail"), upstream_config="configs/eval/ovad/ovad.yaml",
    loader_options={"required_fields": ("extra_info.ovad_result.att_vec",)}, reads_captions=False,
))  # fmt: skip
register_task(BenchmarkTask(
    "coco", "COCO region recognition: top-1 accuracy (§6)", f"{_PROTOCOLS}:score_coco",
    ("accuracy",), upstream_config="configs/eval/coco/coco.yaml", loader_options={"read_classes": True, "required_fields": ("extra_info.coco_result.category",)},
    reads_captions=False,
))  # fmt: skip
