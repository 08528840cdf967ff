"""The benchmark metrics (docs/upstream/evaluation.md §3-§6) on small cases worked out by hand, against
pycocoevalcap's own COCOEvalCap, and as `evaluate` modules loaded offline by path."""

import json

import evaluate
import numpy as np
import pytest

from dynrefer_hf.metrics import (
    DenseCaptionImage,
    assign_predictions,
    attribute_map,
    caption_scores,
    class_accuracy,
    dense_caption_map,
    evaluate_module_path,
    interpolated_average_precision,
    merge_boxes,
    meteor_scores,
)


def exact_match_meteor(candidates, references):
    """A stand-in for METEOR in the hand-worked cases: 1 when the candidate is one of its references."""
    return np.array([1.0 if candidate in refs else 0.0 for candidate, refs in zip(candidates, references)])


# ---------------------------------------------------------------- dense captioning (§4)

# Image 1: g0 and g1 overlap at IoU 100/110 = 0.91 >= 0.7 and merge into one box [0, 0, 10, 10.5] with both
# captions; g2 and g3 stay alone: 3 merged boxes. Predictions: p0 hits the merged box (IoU 100/105), p1 is a
# duplicate of p0 (the box is taken: not ok), p2 has no overlap at all (no references), p3 finds g2 with the
# wrong words. p1 and p3 tie at 0.8: the stable sort keeps p1 first.
IMAGE_1 = DenseCaptionImage(
    gt_boxes=[[0, 0, 10, 10], [0, 0, 10, 11], [20, 20, 30, 30], [40, 0, 50, 10]],
    gt_captions=["red circle", "big red circle", "blue square", "green star"],
    boxes=[[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]],
    scores=[0.9, 0.8, 0.7, 0.8],
    captions=["red circle", "red circle", "black cross", "green triangle"],
)
# Image 2 has ground truth but no prediction: it is left out, its boxes do not count.
IMAGE_2 = DenseCaptionImage(gt_boxes=[[0, 0, 5, 5]], gt_captions=["a dot"], boxes=[], scores=[], captions=[])


def test_merge_boxes_groups_overlapping_ground_truth():
    groups = merge_boxes(IMAGE_1.gt_boxes)
    assert [list(g) for g in groups] == [[0, 1], [2], [3]]


def test_assignment_marks_duplicates_and_misses():
    records, merged = assign_predictions(IMAGE_1)
    assert merged == 3
    assert [r.candidate for r in records] == ["red circle", "red circle", "green triangle", "black cross"]
    assert [r.ok for r in records] == [True, False, True, False]
    assert records[0].iou == pytest.approx(100 / 105)
    assert records[0].references == ["red circle", "big red circle"]
    assert records[1].references == ["red circle", "big red circle"]  # same box, already taken
    assert records[2].iou == 1.0 and records[2].references == ["blue square"]
    assert records[3].iou == 0.0 and records[3].references == []


def test_dense_caption_map_on_a_hand_worked_case():
    result = dense_caption_map([IMAGE_1, IMAGE_2], meteor=exact_match_meteor)
    assert result["num_images"] == 1 and result["num_gt_boxes"] == 3 and result["num_predictions"] == 4
    # Sorted records: p0 (TP), p1 (duplicate: FP), p3 (right box, wrong words), p2 (no overlap: FP).
    # Caption APs: only p0 is a TP: recall 1/3 with precision 1 -> levels 0..0.33 = 34 of 100 -> 0.34.
    assert list(result["ap_breakdown"].values()) == [pytest.approx(0.34)] * 30
    assert result["map"] == pytest.approx(0.34)
    # Detection APs: p0 and p3 are TPs: levels 0..0.33 at precision 1, 0.34..0.66 at precision 2/3.
    assert result["detmap"] == pytest.approx((34 * 1 + 33 * 2 / 3) / 100)
    assert len(result["ap_breakdown"]) == 30 and len(result["det_breakdown"]) == 5


def test_ties_keep_input_order():
    # With p3 listed before p1, the tie at 0.8 puts the true positive p3 first: detection AP rises to 0.67.
    reordered = DenseCaptionImage(
        gt_boxes=IMAGE_1.gt_boxes,
        gt_captions=IMAGE_1.gt_captions,
        boxes=[IMAGE_1.boxes[i] for i in (0, 3, 2, 1)],
        scores=[IMAGE_1.scores[i] for i in (0, 3, 2, 1)],
        captions=[IMAGE_1.captions[i] for i in (0, 3, 2, 1)],
    )
    result = dense_caption_map([reordered], meteor=exact_match_meteor)
    assert result["detmap"] == pytest.approx(0.67)


def test_iou_and_meteor_thresholds():
    # IoU 0.5: a TP at IoU thresholds 0.3, 0.4, 0.5 only.
    half = DenseCaptionImage([[0, 0, 10, 10]], ["a"], [[0, 0, 10, 5]], [1.0], ["a"])
    result = dense_caption_map([half], meteor=exact_match_meteor)
    assert result["detmap"] == pytest.approx(3 / 5) and result["map"] == pytest.approx(3 / 5)
    assert result["det_breakdown"]["iou_0.5"] == 1.0 and result["det_breakdown"]["iou_0.6"] == 0.0
    # METEOR 0.12: a TP at METEOR thresholds 0, 0.05, 0.1 only (strictly greater).
    exact = DenseCaptionImage([[0, 0, 10, 10]], ["a"], [[0, 0, 10, 10]], [1.0], ["a"])
    result = dense_caption_map([exact], meteor=lambda c, r: np.full(len(c), 0.12))
    assert result["map"] == pytest.approx(3 / 6) and result["detmap"] == 1.0
    assert result["ap_breakdown"]["iou_0.7_meteor_0.1"] == 1.0
    assert result["ap_breakdown"]["iou_0.7_meteor_0.15"] == 0.0


def test_recall_levels_are_float32_as_upstream():
    # 21 TPs over 50 boxes: recall 21/50 is 0.41999999 in float32 and the level 0.42 of a float32 arange is
    # 0.42000002, so that level is not reached: 42 levels (0..0.41), not the 43 a float64 port would count.
    assert interpolated_average_precision(np.ones(21, dtype=bool), 50) == pytest.approx(0.42)
    boxes = [[10 * i, 0, 10 * i + 5, 5] for i in range(50)]
    image = DenseCaptionImage(boxes, ["x"] * 50, boxes[:21], list(np.linspace(1, 0.5, 21)), ["x"] * 21)
    assert dense_caption_map([image], meteor=exact_match_meteor)["map"] == pytest.approx(0.42)


def test_dense_caption_map_rejects_empty_input():
    with pytest.raises(ValueError, match="at least one prediction"):
        dense_caption_map([IMAGE_2])
    with pytest.raises(ValueError, match="one of each per prediction"):
        DenseCaptionImage([[0, 0, 1, 1]], ["a"], [[0, 0, 1, 1]], [1.0, 0.5], ["a"])


@pytest.mark.slow
def test_dense_caption_map_with_real_meteor():
    """METEOR 1.5 in one Java process (slow to start, so one launch for the whole evaluation)."""
    calls = []

    def recording_meteor(candidates, references):
        scores = meteor_scores(candidates, references)
        calls.append((candidates, references, scores))
        return scores

    result = dense_caption_map([IMAGE_1, IMAGE_2], meteor=recording_meteor)
    ((candidates, references, scores),) = calls
    assert candidates == ["red circle", "red circle", "green triangle", "black cross"]
    # the exact match scores near 1; "green triangle" vs "blue square" shares no word: 0; the record without
    # references is not sent to METEOR: 0. So the mAP is the exact-match stand-in's.
    assert scores[0] > 0.9 and scores[0] == scores[1] and scores[2] == 0.0
    assert references[3] == [] and scores[3] == 0.0
    assert result["map"] == pytest.approx(0.34) and result["detmap"] == pytest.approx(0.56)


# ---------------------------------------------------------------- region captioning (§3)

CANDIDATES = {1: "A red, striped circle.", 2: "a blue square above a star", 3: "the dog"}
REFERENCES = {
    1: ["a red striped circle left of a blue square"],
    2: ["a blue square above an orange star", "blue square"],
    3: ["large green checkered triangle"],
}


@pytest.mark.slow
def test_caption_scores_equal_cocoevalcap(tmp_path, monkeypatch):
    """The same numbers as pycocoevalcap's COCOEvalCap over pycocotools COCO files (SPICE switched off)."""
    import pycocoevalcap.eval as coco_eval_module
    from pycocotools.coco import COCO

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(coco_eval_module, "Spice", NoSpice)
    images = [{"id": key} for key in REFERENCES]
    gt = {"images": images, "annotations": [], "type": "captions"}
    for key, refs in REFERENCES.items():
        gt["annotations"] += [{"id": len(gt["annotations"]) + 1, "image_id": key, "caption": r} for r in refs]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "res.json").write_text(
        json.dumps({"images": images, "annotations": [{"id": k, "image_id": k, "caption": c} for k, c in CANDIDATES.items()]})
    )
    coco_eval = coco_eval_module.COCOEvalCap(COCO(str(tmp_path / "gt.json")), COCO(str(tmp_path / "res.json")))
    coco_eval.evaluate()
    ours = caption_scores(CANDIDATES, REFERENCES)
    for name, value in ours.scores.items():
        assert value == pytest.approx(coco_eval.eval[name], rel=1e-12, abs=1e-15), name
    assert ours.per_item["CIDEr"][2] == 0.0 and ours.scores["CIDEr"] > 0


def test_cider_d_tokenizes_like_ptb():
    raw = caption_scores({0: "A Red, striped circle."}, {0: ["a red striped circle"]}, metrics=("CIDEr", "Bleu_4"))
    clean = caption_scores({0: "a red striped circle"}, {0: ["a red striped circle"]}, metrics=("CIDEr", "Bleu_4"), tokenize=False)
    assert raw.scores == clean.scores


@pytest.mark.parametrize(
    "candidates, references, message",
    [
        ({1: "a"}, {2: ["a"]}, "same keys"),
        ({1: "a"}, {1: []}, "non-empty list"),
        ({1: "a"}, {1: "a"}, "non-empty list"),
        ({}, {}, "at least one"),
    ],
)
def test_caption_scores_reject_bad_input(candidates, references, message):
    with pytest.raises(ValueError, match=message):
        caption_scores(candidates, references)


def test_missing_java_is_one_clear_error(monkeypatch):
    import shutil

    from dynrefer_hf.metrics import JavaNotFoundError

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(JavaNotFoundError, match="default-jre-headless"):
        caption_scores({0: "a"}, {0: ["a"]}, metrics=("CIDEr",))


# ---------------------------------------------------------------- OVAD attributes (§5) and accuracy (§6)


def test_attribute_map_on_a_hand_worked_case():
    scores = np.array([[0.9, 0.1, 0.5], [0.8, 0.2, 0.5], [0.7, 0.3, 0.1], [0.6, 0.4, 0.2]])
    labels = np.array([[1, 0, 1], [0, 0, 0], [1, 0, 0], [-1, 0, 1]])
    result = attribute_map(scores, labels, groups=["head", "head", "tail"])
    # attribute 0: ranking TP, FP, TP (the -1 is dropped): AP = 1/2 * 1 + 1/2 * 2/3
    # attribute 1: no positive -> NaN, left out
    # attribute 2: the tie at 0.5 holds one TP of 2 (precision 1/2), then 0.2 the second TP (precision 2/3)
    expected = [0.5 + 1 / 3, np.nan, 0.25 + 1 / 3]
    np.testing.assert_allclose(result.per_attribute, expected)
    assert result.map == pytest.approx((expected[0] + expected[2]) / 2)
    assert result.groups == {"head": pytest.approx(expected[0]), "tail": pytest.approx(expected[2])}


def test_class_accuracy_hand_case():
    assert class_accuracy([[0.1, 0.9], [0.5, 0.5], [0.2, 0.1], [0.0, 1.0]], [1, 0, 1, -1]) == pytest.approx(2 / 3)


# ---------------------------------------------------------------- evaluate modules


def test_label_evaluate_modules_load_offline_and_agree():
    accuracy = evaluate.load(evaluate_module_path("region_accuracy"))
    assert accuracy.compute(predictions=[[0.1, 0.9], [0.5, 0.5]], references=[1, 1]) == {"accuracy": 0.5}

    ovad = evaluate.load(evaluate_module_path("ovad_attribute_map"))
    out = ovad.compute(predictions=[[0.9, 0.1], [0.2, 0.8]], references=[[1, 0], [0, 1]], groups=["head", "tail"])
    assert out["map"] == 1.0 and out["groups"] == {"head": 1.0, "tail": 1.0}


@pytest.mark.slow  # METEOR and the PTB tokenizer are Java programs
def test_caption_evaluate_modules_load_offline_and_agree():
    densecap = evaluate.load(evaluate_module_path("dense_captioning_map"))
    out = densecap.compute(
        predictions=[{"boxes": IMAGE_1.boxes, "scores": IMAGE_1.scores, "captions": IMAGE_1.captions}],
        references=[{"boxes": IMAGE_1.gt_boxes, "captions": IMAGE_1.gt_captions}],
    )
    assert out["map"] == pytest.approx(0.34) and out["detmap"] == pytest.approx(0.56)

    captioning = evaluate.load(evaluate_module_path("region_captioning"))
    keys = list(CANDIDATES)
    out = captioning.compute(
        predictions=[CANDIDATES[k] for k in keys], references=[REFERENCES[k] for k in keys], metrics=["CIDEr", "Bleu_4"]
    )
    expected = caption_scores(CANDIDATES, REFERENCES, metrics=("CIDEr", "Bleu_4")).scores
    assert out == pytest.approx(expected)
    with pytest.raises(ValueError, match="ships"):
        evaluate_module_path("bleu")
