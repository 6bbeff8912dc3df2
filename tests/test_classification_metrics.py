"""Classification metrics on hand-built cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from fewlabel.metrics.classification import best_metric_key, classification_metrics, is_better

CLASSES3 = ["a", "b", "c"]


def _one_hot(labels, k, p=0.9):
    probs = np.full((len(labels), k), (1 - p) / (k - 1))
    probs[np.arange(len(labels)), labels] = p
    return probs


def test_perfect_prediction():
    y = np.array([0, 1, 2, 0, 1, 2])
    m = classification_metrics(y, _one_hot(y, 3), CLASSES3)
    assert m["accuracy"] == 1.0
    assert m["balanced_accuracy"] == 1.0
    assert m["kappa"] == pytest.approx(1.0)
    assert m["auc"] == pytest.approx(1.0)
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]
    for name in CLASSES3:
        assert m["per_class"][name]["sensitivity"] == 1.0
        assert m["per_class"][name]["specificity"] == 1.0
    assert m["notes"] == []
    json.dumps(m)  # must be serialisable as is


def test_known_confusion_matrix_gives_known_rates():
    # Truth: 4 a, 2 b, 2 c. Predictions: a→[a,a,a,b]; b→[b,c]; c→[c,c].
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    m = classification_metrics(y, _one_hot(pred, 3), CLASSES3)
    assert m["confusion_matrix"] == [[3, 1, 0], [0, 1, 1], [0, 0, 2]]
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["per_class"]["a"]["sensitivity"] == pytest.approx(3 / 4)
    assert m["per_class"]["b"]["sensitivity"] == pytest.approx(1 / 2)
    assert m["per_class"]["c"]["sensitivity"] == pytest.approx(1.0)
    # Specificity of b: negatives are 6 (a and c), one of them (an a) predicted b.
    assert m["per_class"]["b"]["specificity"] == pytest.approx(5 / 6)
    assert m["per_class"]["c"]["specificity"] == pytest.approx(5 / 6)
    assert m["per_class"]["a"]["specificity"] == pytest.approx(1.0)
    assert m["per_class"]["c"]["precision"] == pytest.approx(2 / 3)
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2 + 1) / 3)
    # Quadratic kappa by hand: weights (i-j)^2/(k-1)^2, expected from the marginals.
    obs = np.array(m["confusion_matrix"], dtype=float)
    w = np.array([[(i - j) ** 2 / 4 for j in range(3)] for i in range(3)])
    exp = np.outer(obs.sum(1), obs.sum(0)) / obs.sum()
    assert m["kappa"] == pytest.approx(1 - (w * obs).sum() / (w * exp).sum())


def test_auc_matches_sklearn_multiclass_and_binary():
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2] * 10)
    logits = rng.normal(size=(30, 3)) + np.eye(3)[y] * 1.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = classification_metrics(y, probs, CLASSES3)
    assert m["auc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert 0.5 < m["auc"] < 1.0

    yb = np.array([0, 0, 1, 1, 1, 0])
    pb = np.array([0.2, 0.6, 0.7, 0.4, 0.9, 0.1])
    mb = classification_metrics(yb, np.stack([1 - pb, pb], 1), ["neg", "pos"])
    assert mb["auc"] == pytest.approx(roc_auc_score(yb, pb))
    # 8 of the 9 positive/negative pairs are ranked correctly (0.4 < 0.6 is the miss).
    assert mb["auc"] == pytest.approx(8 / 9)


def test_absent_class_is_null_with_a_reason():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.2, 0.6], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1]])
    m = classification_metrics(y, probs, CLASSES3)
    assert m["per_class"]["c"]["sensitivity"] is None
    assert m["per_class"]["c"]["auc"] is None
    assert m["per_class"]["c"]["support"] == 0
    assert m["auc"] == pytest.approx(np.mean([m["per_class"]["a"]["auc"], m["per_class"]["b"]["auc"]]))
    assert any("'c'" in note for note in m["notes"])
    json.dumps(m, allow_nan=False)


def test_single_class_truth_gives_null_auc_and_kappa():
    y = np.array([1, 1, 1])
    m = classification_metrics(y, _one_hot(y, 3), CLASSES3)
    assert m["auc"] is None
    assert m["kappa"] is None
    assert m["accuracy"] == 1.0
    assert len(m["notes"]) >= 2
    json.dumps(m, allow_nan=False)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="shape"):
        classification_metrics([0, 1], np.ones((3, 3)) / 3, CLASSES3)
    with pytest.raises(ValueError, match="labels"):
        classification_metrics([0, 3], np.ones((2, 3)) / 3, CLASSES3)
    with pytest.raises(ValueError, match="empty"):
        classification_metrics([], np.zeros((0, 3)), CLASSES3)


def test_best_metric_resolution_and_comparison():
    assert best_metric_key("auto", 5) == "kappa"
    assert best_metric_key("auto", 2) == "auc"
    assert best_metric_key("accuracy", 5) == "accuracy"
    assert is_better("kappa", 0.5, 0.4)
    assert not is_better("kappa", 0.4, 0.5)
    assert is_better("loss", 0.3, 0.4)
    assert is_better("auc", 0.1, None)
    assert not is_better("auc", None, 0.1)
