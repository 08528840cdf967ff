"""Metrics against their reference implementations: pycocoevalcap's CIDEr-D and scikit-learn's AP."""

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider
from sklearn.metrics import average_precision_score

from dynrefer_hf.metrics import attribute_map, average_precision, cider_d, class_accuracy, simple_tokenize

WORDS = (
    "a",
    "the",
    "red",
    "blue",
    "small",
    "large",
    "striped",
    "dotted",
    "circle",
    "square",
    "left",
    "right",
    "of",
    "above",
    "below",
    "an",
    "orange",
)


def _random_sentence(rng, low=2, high=12):
    return " ".join(rng.choice(WORDS, size=rng.integers(low, high)))


def _pycocoevalcap_cider(candidates, references):
    gts = {i: list(refs) for i, refs in enumerate(references)}
    res = {i: [cand] for i, cand in enumerate(candidates)}
    return Cider().compute_score(gts, res)


def test_cider_d_matches_pycocoevalcap_on_fixed_captions():
    candidates = [
        "small red striped circle left of a blue square",
        "small red red red red circle",  # repeated n-grams: clipping matters
        "the dog",  # no overlap and very different length: penalty and zero vectors
        "large blue dotted square above an orange star",
        "circle",  # single word: no bigrams at all
    ]
    references = [
        [
            "small red striped circle left of a blue square",
            "a small red circle with stripes left of a blue square",
        ],
        ["small red circle", "red circle"],
        ["large green checkered triangle below a black cross"],
        [
            "large blue dotted square above an orange star",
            "blue square above a star",
            "a large dotted square",
        ],
        ["small circle"],
    ]
    expected_score, expected_scores = _pycocoevalcap_cider(candidates, references)
    result = cider_d(candidates, references, tokenize=False)
    np.testing.assert_allclose(result.scores, expected_scores, rtol=1e-12, atol=1e-12)
    assert result.score == pytest.approx(expected_score, rel=1e-12)
    assert result.scores[0] > 1.0 and result.scores[2] == 0.0


def test_cider_d_matches_pycocoevalcap_on_random_corpora():
    rng = np.random.default_rng(0)
    for _ in range(5):
        size = int(rng.integers(1, 25))
        candidates = [_random_sentence(rng) for _ in range(size)]
        references = [[_random_sentence(rng) for _ in range(rng.integers(1, 5))] for _ in range(size)]
        expected_score, expected_scores = _pycocoevalcap_cider(candidates, references)
        result = cider_d(candidates, references, tokenize=False)
        np.testing.assert_allclose(result.scores, expected_scores, rtol=1e-12, atol=1e-12)
        assert result.score == pytest.approx(expected_score, rel=1e-12)


def test_cider_d_tokenizes_before_scoring():
    raw = cider_d(["A Red, striped circle."], [["a red striped circle"]])
    clean = cider_d(["a red striped circle"], [["a red striped circle"]], tokenize=False)
    np.testing.assert_array_equal(raw.scores, clean.scores)
    assert simple_tokenize("The man's  T-shirt, (red)!") == "the man's t shirt red"


@pytest.mark.parametrize(
    "candidates, references, message",
    [
        (["a"], [["a"], ["b"]], "1 candidates but 2"),
        (["a"], [[]], "non-empty list"),
        (["a"], ["a"], "non-empty list"),
        ([], [], "at least one"),
    ],
)
def test_cider_d_rejects_bad_input(candidates, references, message):
    with pytest.raises(ValueError, match=message):
        cider_d(candidates, references)


def test_average_precision_matches_sklearn_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(20):
        size = int(rng.integers(2, 60))
        labels = rng.random(size) < 0.3
        labels[rng.integers(size)] = True
        scores = np.round(rng.random(size), 1)  # coarse values: many ties
        assert average_precision(scores, labels) == pytest.approx(
            average_precision_score(labels, scores), abs=1e-12
        )
    assert np.isnan(average_precision(np.array([0.3, 0.2]), np.array([0, 0])))


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
