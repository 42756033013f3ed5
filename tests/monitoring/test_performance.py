"""Accuracy, per-class scores and calibration against scikit-learn and by construction."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from monitoring.performance import confusion, held_out_performance, scores


def test_scores_match_scikit_learn_including_a_class_never_predicted():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 5, 400)
    predicted = np.where(rng.random(400) < 0.7, true, rng.integers(0, 4, 400))  # never 4 wrong
    predicted[predicted == 4] = 3  # class 4 is never predicted
    matrix = confusion(true, predicted, 5)
    assert matrix.tolist() == confusion_matrix(true, predicted, labels=range(5)).tolist()
    found = scores(matrix, list("abcde"))
    precision, recall, f1, support = precision_recall_fscore_support(
        true, predicted, labels=range(5), zero_division=0
    )
    assert found["accuracy"] == pytest.approx(np.mean(true == predicted))
    assert found["macro_f1"] == pytest.approx(f1.mean())
    for i, name in enumerate("abcde"):
        assert found["per_class"][name]["precision"] == pytest.approx(precision[i])
        assert found["per_class"][name]["recall"] == pytest.approx(recall[i])
        assert found["per_class"][name]["support"] == support[i]
    assert found["per_class"]["e"]["precision"] == 0.0
    empty = scores(np.zeros((3, 3)), list("abc"))
    assert empty["accuracy"] is None and empty["macro_precision"] is None  # no labels yet


def test_macro_figures_average_over_the_labelled_classes_only():
    """Ten labels, all of class 3 and all correct, out of ten classes: every figure is 1."""
    true = np.full(10, 3)
    found = scores(confusion(true, true, 10), [str(d) for d in range(10)])
    assert found["accuracy"] == 1.0
    assert (found["macro_precision"], found["macro_recall"], found["macro_f1"]) == (1.0, 1.0, 1.0)
    # A wrong answer for a labelled class still counts against it, in the labelled classes.
    found = scores(confusion(np.array([3, 3]), np.array([3, 5]), 10), [str(d) for d in range(10)])
    assert found["macro_recall"] == 0.5 and found["macro_precision"] == 1.0


def test_calibrated_and_overconfident_models():
    """Labels drawn from the model's own probabilities: mean confidence tracks accuracy.
    The same predictions claimed with 0.99 confidence: it does not, and the profile says so."""
    rng = np.random.default_rng(1)
    probabilities = rng.dirichlet(np.ones(4) * 0.7, size=20_000)
    labels = np.array([rng.choice(4, p=p) for p in probabilities])
    honest = held_out_performance(labels, probabilities)
    assert honest["expected_calibration_error"] < 0.02 and honest["calibrated"]
    assert honest["mean_confidence"] == pytest.approx(honest["accuracy"], abs=0.02)
    overconfident = np.full_like(probabilities, 0.01 / 3)
    overconfident[np.arange(len(labels)), probabilities.argmax(axis=1)] = 0.99
    claimed = held_out_performance(labels, overconfident)
    assert claimed["accuracy"] == honest["accuracy"]
    assert claimed["expected_calibration_error"] == pytest.approx(0.99 - claimed["accuracy"])
    assert not claimed["calibrated"] and "not a reliable accuracy estimate" in claimed["note"]
