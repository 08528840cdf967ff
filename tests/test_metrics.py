"""Attribute mAP and class accuracy against slow obviously-correct loops (the caption and dense-captioning
metrics: tests/test_eval_metrics.py)."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from dynrefer_hf.metrics import attribute_map, class_accuracy


def test_attribute_map_ignores_minus_one_and_attributes_without_positives():
    rng = np.random.default_rng(2)
    labels = rng.choice([-1, 0, 1], size=(40, 6), p=[0.2, 0.5, 0.3])
    labels[:, 4] = np.where(labels[:, 4] == 1, 0, labels[:, 4])  # attribute 4: no positive
    scores = np.round(rng.random((40, 6)), 2)
    result = attribute_map(scores, labels)

    expected = []
    for a in range(6):
        kept = labels[:, a] != -1
        positives = labels[kept, a] == 1
        expected.append(average_precision_score(positives, scores[kept, a]) if positives.any() else np.nan)
    np.testing.assert_allclose(result.per_attribute, expected, atol=1e-12)
    assert np.isnan(result.per_attribute[4])
    assert result.map == pytest.approx(np.mean([ap for ap in expected if not np.isnan(ap)]), abs=1e-12)
    # Changing the score of an ignored label changes nothing.
    ignored = np.argwhere(labels == -1)[0]
    scores[tuple(ignored)] = 1e6
    assert attribute_map(scores, labels).map == pytest.approx(result.map, abs=1e-12)


def test_attribute_map_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        attribute_map(np.zeros((3, 2)), np.zeros((3, 3), dtype=int))
    with pytest.raises(ValueError, match="1 \\(positive\\)"):
        attribute_map(np.zeros((2, 2)), np.full((2, 2), 2))
    with pytest.raises(ValueError, match="no attribute has a positive"):
        attribute_map(np.zeros((2, 2)), np.zeros((2, 2), dtype=int))
    with pytest.raises(ValueError, match="2-D"):
        attribute_map(np.zeros(3), np.zeros(3))


def test_class_accuracy_against_a_loop():
    rng = np.random.default_rng(3)
    scores = np.round(rng.random((50, 5)), 1)  # ties: the first maximum wins, as np.argmax upstream
    labels = rng.integers(-1, 5, size=50)
    correct = total = 0
    for row, label in zip(scores, labels):
        if label == -1:
            continue
        total += 1
        best = max(range(5), key=lambda c: (row[c], -c))
        correct += int(best == label)
    assert class_accuracy(scores, labels) == pytest.approx(correct / total)
    with pytest.raises(ValueError, match="no region has a class label"):
        class_accuracy(scores[:2], np.array([-1, -1]))
    with pytest.raises(ValueError, match="must lie in"):
        class_accuracy(scores[:1], np.array([5]))
