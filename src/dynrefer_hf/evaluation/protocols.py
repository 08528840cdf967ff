"""The paper's benchmark protocols (docs/upstream/evaluation.md §1, §3-§6): the scorers of upstream-format result
files (the ground-truth file with ``extra_info.pred_result`` per annotation), one per protocol, all with the
signature ``scorer(result, gt, scoring: Scoring) -> metrics`` that the task records of ``tasks.py`` name."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..data.upstream import FREQUENCY_SETS, coco_class_names, segmentation_box
from ..metrics import DenseCaptionImage, attribute_map, caption_scores, dense_caption_map, mean_ap_by_group
from .tasks import Scoring, get_task

__all__ = [
    "ResultFileError",
    "format_metrics_table",
    "score_captioning",
    "score_coco",
    "score_densecap",
    "score_ovad",
    "score_result",
]


class ResultFileError(ValueError):
    """A result or ground-truth file that the protocol cannot score, naming the file, record and field."""


def _by_id(content: dict, key: str) -> dict:
    return {item["id"]: item for item in content.get(key, [])}


def _prediction(annotation: dict) -> dict | None:
    return (annotation.get("extra_info") or {}).get("pred_result")


def _first(value):
    # upstream's result files may hold a list of captions (num_return_sequences > 1): the first is scored
    return value[0] if isinstance(value, list) else value


def _gt_caption(annotation: dict, gt_name: str) -> str:
    caption = annotation.get("caption")
    if not isinstance(caption, str):
        raise ResultFileError(
            f"{gt_name}: annotation id {annotation.get('id')}, field 'caption': "
            + ("missing" if caption is None else f"must be a string, got {type(caption).__name__}")
            + " (the ground-truth caption this protocol scores against)"
        )
    return caption


def score_captioning(result: dict, gt: dict, scoring: Scoring) -> dict:
    """§3: every result annotation's caption replaced by its prediction; COCOEvalCap per image id."""
    result_name, annotation_ids = scoring.result_name, scoring.annotation_ids
    references: dict = {}
    for annotation in gt["annotations"]:
        references.setdefault(annotation["image_id"], []).append(_gt_caption(annotation, scoring.gt_name))
    candidates: dict = {}
    for annotation in result["annotations"]:
        if annotation_ids is not None and annotation["id"] not in annotation_ids:
            continue
        prediction = _prediction(annotation)
        if prediction is None:
            raise ResultFileError(
                f"{result_name}: annotation id {annotation['id']}, field 'extra_info.pred_result': missing "
                "(region captioning scores every annotation of the result file)"
            )
        image_id = annotation["image_id"]
        if image_id in candidates:
            raise ResultFileError(
                f"{result_name}: image id {image_id} has several annotations, but the region-captioning protocol "
                "needs exactly one annotation per image id (docs/upstream/evaluation.md §2); use --task vg-densecap "
                "for files with several regions per image"
            )
        if image_id not in references:
            raise ResultFileError(f"{result_name}: image id {image_id}: no ground-truth annotation has this image id")
        candidates[image_id] = str(_first(prediction.get("caption", "")))
    scores = caption_scores(candidates, {key: references[key] for key in candidates})
    metrics = {name: 100 * value for name, value in scores.scores.items()}
    return {**metrics, "num_regions": len(candidates), "agg_metrics": metrics["METEOR"]}


def score_densecap(result: dict, gt: dict, scoring: Scoring) -> dict:
    """§4: GT boxes and captions per image of the GT file (file order); predictions from the result file."""
    annotation_ids = scoring.annotation_ids
    predictions: dict = {}
    for annotation in result["annotations"]:
        prediction = _prediction(annotation)
        if prediction is None or (annotation_ids is not None and annotation["id"] not in annotation_ids):
            continue
        extra = annotation.get("extra_info") or {}
        score = (extra.get("grit_result") or {}).get("score", prediction.get("score", 1))
        predictions.setdefault(annotation["image_id"], []).append(
            (segmentation_box(annotation["segmentation"]), float(_first(score)), str(_first(prediction.get("caption", ""))))
        )
    ground_truth: dict = {}
    for annotation in gt["annotations"]:
        ground_truth.setdefault(annotation["image_id"], []).append(
            (segmentation_box(annotation["segmentation"]), _gt_caption(annotation, scoring.gt_name))
        )
    images = []
    skipped_without_ground_truth = 0
    for image in gt["images"]:
        preds = predictions.get(image["id"], [])
        truth = ground_truth.get(image["id"], [])
        if preds and not truth:
            # upstream's evaluator fails on such an image and skips it
            skipped_without_ground_truth += 1
            continue
        images.append(
            DenseCaptionImage(
                gt_boxes=[box for box, _ in truth],
                gt_captions=[caption for _, caption in truth],
                boxes=[box for box, _, _ in preds],
                scores=[score for _, score, _ in preds],
                captions=[caption for _, _, caption in preds],
            )
        )
    out = dense_caption_map(images)
    return {
        "map": 100 * out["map"],
        "detmap": 100 * out["detmap"],
        **{f"ap/{key}": 100 * value for key, value in out["ap_breakdown"].items()},
        **{f"det/{key}": 100 * value for key, value in out["det_breakdown"].items()},
        "num_images": out["num_images"],
        "num_predictions": out["num_predictions"],
        "num_gt_boxes": out["num_gt_boxes"],
        "images_skipped_without_ground_truth": skipped_without_ground_truth,
        "agg_metrics": 100 * out["map"],
    }


def _percentages(prefix: str, fractions: dict[str, float]) -> dict[str, float | None]:
    """``{prefix + name: 100 * value}``; None where the value is NaN (a group without a positive)."""
    return {prefix + name: None if np.isnan(value) else 100 * value for name, value in fractions.items()}


# upstream's ovad_validate groups attributes by their number of names (after the last ":"), beside head/medium/tail
_SYNONYM_GROUPS = ("single", "multiple")


def _synonym_group(attribute_name: str) -> str:
    return "multiple" if "/" in attribute_name.split(":")[-1] else "single"


def score_ovad(result: dict, gt: dict, scoring: Scoring) -> dict:
    """§5: attribute scores per annotation (zeros without a prediction), labels from ``ovad_result.att_vec``."""
    result_name, gt_name, annotation_ids = scoring.result_name, scoring.gt_name, scoring.annotation_ids
    attrs = gt.get("attrs")
    if not isinstance(attrs, list) or not attrs:
        raise ResultFileError(f"{gt_name}: the file, field 'attrs': missing (the OVAD attribute definitions)")
    attrs = sorted(attrs, key=lambda attr: attr["id"])
    num_attributes = len(attrs)
    predicted = _by_id(result, "annotations")
    scores, labels = [], []
    missing = 0
    for annotation in gt["annotations"]:
        if annotation_ids is not None and annotation["id"] not in annotation_ids:
            continue
        vector = ((annotation.get("extra_info") or {}).get("ovad_result") or {}).get("att_vec")
        if not isinstance(vector, list) or len(vector) != num_attributes:
            raise ResultFileError(
                f"{gt_name}: annotation id {annotation['id']}, field 'extra_info.ovad_result.att_vec': missing or "
                f"not {num_attributes} labels"
            )
        prediction = _prediction(predicted.get(annotation["id"], {}))
        if prediction is None:
            missing += 1
            row = [0.0] * num_attributes
        else:
            row = prediction.get("attr")
            if not isinstance(row, list) or len(row) != num_attributes:
                raise ResultFileError(
                    f"{result_name}: annotation id {annotation['id']}, field 'extra_info.pred_result.attr': "
                    f"must hold {num_attributes} scores (one per entry of 'attrs'), got "
                    f"{len(row) if isinstance(row, list) else type(row).__name__}"
                )
        scores.append(row)
        labels.append(vector)
    # upstream clips scores to [0, 1] (AttEvaluator)
    scores = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    out = attribute_map(scores, np.asarray(labels, dtype=np.int64))
    metrics = {"ap/all": 100 * out.map}
    frequency = mean_ap_by_group(out.per_attribute, [str(attr.get("freq_set", "all")) for attr in attrs])
    metrics.update(_percentages("ap/", {name: frequency[name] for name in FREQUENCY_SETS if name in frequency}))
    # upstream also prints the mean per parent type (colour, material, ...); metrics.json keeps them
    parent_types = [attr.get("parent_type") for attr in attrs]
    if all(parent_types):
        metrics.update(_percentages("ap/type/", mean_ap_by_group(out.per_attribute, parent_types)))
    # and the mean over attributes named by one word vs several "/"-separated synonyms ("...:clean/neat")
    synonyms = mean_ap_by_group(out.per_attribute, [_synonym_group(str(attr.get("name", ""))) for attr in attrs])
    metrics.update(_percentages("ap/", {name: synonyms.get(name, float("nan")) for name in _SYNONYM_GROUPS}))
    return {
        **metrics,
        "num_regions": len(labels),
        "regions_without_prediction": missing,
        "agg_metrics": round(100 * out.map, 2),
    }


def score_coco(result: dict, gt: dict, scoring: Scoring) -> dict:
    """§6: argmax of ``pred_result.cls`` against ``coco_result.category``; no prediction counts as wrong."""
    result_name, gt_name, annotation_ids = scoring.result_name, scoring.gt_name, scoring.annotation_ids
    class_names = list(coco_class_names() if scoring.class_names is None else scoring.class_names)
    known = set(class_names)
    predicted = _by_id(result, "annotations")
    correct = total = missing = 0
    for annotation in gt["annotations"]:
        if annotation_ids is not None and annotation["id"] not in annotation_ids:
            continue
        category = ((annotation.get("extra_info") or {}).get("coco_result") or {}).get("category")
        if category not in known:
            raise ResultFileError(
                f"{gt_name}: annotation id {annotation['id']}, field 'extra_info.coco_result.category': "
                f"{category!r} is not one of the {len(class_names)} class names"
            )
        total += 1
        prediction = _prediction(predicted.get(annotation["id"], {}))
        if prediction is None:
            missing += 1
            continue
        logits = prediction.get("cls")
        if not isinstance(logits, list) or len(logits) != len(class_names):
            raise ResultFileError(
                f"{result_name}: annotation id {annotation['id']}, field 'extra_info.pred_result.cls': must hold "
                f"{len(class_names)} scores (one per class)"
            )
        correct += class_names[int(np.argmax(logits))] == category
    if total == 0:
        raise ResultFileError(f"{gt_name}: no annotation to score")
    accuracy = correct / total
    return {
        "accuracy": 100 * accuracy,
        "num_regions": total,
        "regions_without_prediction": missing,
        "agg_metrics": accuracy,
    }


def score_result(
    task: str,
    result: dict,
    gt: dict,
    *,
    result_name: str = "result file",
    gt_name: str = "ground-truth file",
    class_names: Sequence[str] | None = None,
    annotation_ids=None,
) -> dict:
    """Score an upstream result file's content against its ground truth by ``task``'s scorer.

    Metrics are x 100 (as the paper prints them); ``agg_metrics`` is upstream's own value (METEOR x 100,
    mAP x 100, OVAD mAP x 100 rounded to 2 decimals, COCO accuracy as a fraction). ``class_names``: the
    names ``pred_result.cls`` scores, in order (default: the 80 COCO names). ``annotation_ids``: score only
    these annotations (a partial run, ``--limit``); default: every annotation, as upstream.
    """
    benchmark = get_task(task)
    for name, content in ((result_name, result), (gt_name, gt)):
        if not isinstance(content, dict) or not isinstance(content.get("annotations"), list):
            raise ResultFileError(f"{name}: the file, field 'annotations': missing (not an upstream annotation file)")
    scoring = Scoring(
        result_name=result_name,
        gt_name=gt_name,
        class_names=class_names,
        annotation_ids=None if annotation_ids is None else frozenset(annotation_ids),
    )
    return benchmark.score(result, gt, scoring)


def format_metrics_table(task: str, metrics: dict) -> str:
    """A short Markdown table of the task's headline metrics (x 100)."""
    names = ["task"] + [name for name in get_task(task).headline if name in metrics]
    values = [task] + ["n/a" if metrics[name] is None else f"{metrics[name]:.2f}" for name in names[1:]]
    widths = [max(len(n), len(v)) for n, v in zip(names, values)]
    header = "| " + " | ".join(n.ljust(w) for n, w in zip(names, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    row = "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"
    return f"{header}\n{rule}\n{row}"
