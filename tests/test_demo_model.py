"""The demonstration model shipped in the package: it loads offline and keeps its recorded test scores.

`train_shapes_demo` recorded, next to the scores of the whole test split, the scores of the first
``ci_subset`` test scenes; they are recomputed here (same scenes, views and generation settings) and must
agree within TOLERANCE points (x100 scale): the computation is deterministic, and the tolerance only
absorbs float differences between CPUs, which can flip a beam-search choice or an attribute-score tie for
a region or two. The model must also stay far above chance, i.e. show trained behaviour.
"""

import json

import numpy as np
import pytest
from transformers import AutoModel, AutoProcessor

import dynrefer_hf  # noqa: F401  (registers the Auto classes)
from dynrefer_hf.evaluation import evaluate_regions
from dynrefer_hf.pretrained import SHAPES_DEMO_PATH
from dynrefer_hf.shapes import caption_field_accuracy, shapes_split

TOLERANCE = {"cider_d": 3.0, "attribute_map": 2.0, "class_accuracy": 2.5}
# Per-word caption accuracy: a flipped beam choice changes one region, 1.1 points of the 91 regions.
WORD_TOLERANCE = 3.5
MAX_CHECKPOINT_BYTES = 25 * 1024 * 1024


@pytest.fixture(scope="module")
def shipped():
    scores = json.loads((SHAPES_DEMO_PATH / "test_scores.json").read_text())
    settings = json.loads((SHAPES_DEMO_PATH / "training_settings.json").read_text())
    model = AutoModel.from_pretrained(SHAPES_DEMO_PATH)
    processor = AutoProcessor.from_pretrained(SHAPES_DEMO_PATH)
    return model, processor, scores, settings


def test_checkpoint_is_small_safetensors():
    weights = SHAPES_DEMO_PATH / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size <= MAX_CHECKPOINT_BYTES
    card = (SHAPES_DEMO_PATH / "README.md").read_text()
    assert (
        "a demonstration model on synthetic scenes" in card and "not the DynRefer model of the paper" in card
    )


@pytest.mark.slow
def test_shipped_model_reaches_its_recorded_scores(shipped):
    model, processor, scores, settings = shipped
    recorded = scores["ci_subset"]
    subset = shapes_split("test", recorded["num_images"], seed=settings["data_seed"])
    result = evaluate_regions(
        model,
        processor,
        subset,
        batch_images=settings["eval_batch_images"],
        view_selection=settings["eval_view_selection"],
        task=settings["eval_task"],
    )
    assert result.num_regions == recorded["num_regions"]
    measured = result.percentages()
    for metric, tolerance in TOLERANCE.items():
        assert abs(measured[metric] - recorded[metric]) <= tolerance, (
            metric,
            measured[metric],
            recorded[metric],
        )

    # Trained behaviour, far above chance (1/6 for classes; the positive rate for attribute mAP).
    labels = np.array([row for rows in subset["attributes"] for row in rows])
    positive_rate = 100 * np.mean(
        [np.mean(labels[labels[:, a] != -1, a] == 1) for a in range(labels.shape[1])]
    )
    assert measured["class_accuracy"] > 80
    assert measured["attribute_map"] > positive_rate + 30
    # Every word of the captions keeps its recorded accuracy; the region's own colour, texture and shape
    # ("large red striped circle") are right. The context words ("left of a blue square") are not learnt
    # yet (docs/demo_model.md), so only their recorded accuracy is checked.
    references = [caption for captions in subset["captions"] for caption in captions]
    words = caption_field_accuracy([prediction["caption"] for prediction in result.predictions], references)
    for name, accuracy in words.items():
        assert abs(100 * accuracy - recorded[f"word_{name}"]) <= WORD_TOLERANCE, (name, 100 * accuracy)
    assert min(words["colour"], words["texture"], words["class"]) > 0.8
