"""The paper's benchmarks and the settings of upstream's eval configs (docs/upstream/evaluation.md §1, §3-§6).

Kept free of heavy imports: ``dynrefer eval --help`` lists the tasks without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BENCHMARK_TASKS", "BenchmarkTask"]


@dataclass(frozen=True)
class BenchmarkTask:
    """One benchmark of the paper: its protocol (``metric``) and the settings of upstream's eval config.

    ``tag_threshold`` None: the model's own ``config.tag_threshold`` (0.7 in the released configs).
    """

    name: str
    metric: str  # "captioning" (§3), "densecap" (§4), "ovad" (§5), "coco" (§6)
    tag_threshold: float | None
    upstream_config: str
    description: str


BENCHMARK_TASKS = {
    task.name: task
    for task in (
        BenchmarkTask(
            "refcocog", "captioning", 0.76, "configs/eval/refcoco/refcocog_reg.yaml",
            "RefCOCOg region captioning: METEOR, CIDEr (§3)",
        ),
        BenchmarkTask(
            "vg-reg", "captioning", 0.8, "configs/eval/vg/vg_reg.yaml", "Visual Genome region captioning: METEOR, CIDEr (§3)"
        ),
        BenchmarkTask(
            "vg-densecap", "densecap", None, "configs/eval/vg/vg1.2_densecap.yaml",
            "Visual Genome dense captioning with ground-truth boxes: mAP (§4)",
        ),
        BenchmarkTask("ovad", "ovad", None, "configs/eval/ovad/ovad.yaml", "OVAD attribute detection, box oracle: mAP (§5)"),
        BenchmarkTask("coco", "coco", None, "configs/eval/coco/coco.yaml", "COCO region recognition: top-1 accuracy (§6)"),
    )
}
