"""The label-free estimate and embedding drift, as maths: temperature scaling, the expected
confusion matrix, the domain classifier's AUC and its calibrated thresholds, the support
radius, and the feedback store's audit of the estimate."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from monitoring.embedding import (
    EmbeddingReference,
    calibrate,
    distinct,
    domain_classifier_auc,
    rank_auc,
    threshold_at,
)
from monitoring.estimate import (
    LabelFreeEstimator,
    expected_scores,
    fit_calibration,
    fit_temperature,
    temperature_scale,
)
from monitoring.feedback import FeedbackStore
from monitoring.thresholds import family_quantiles


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def test_temperature_scaling_recovers_the_temperature_that_made_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (20_000, 5))
    # Labels drawn from softmax(logits / 2): the model's own softmax(logits) is overconfident.
    truth = softmax(logits / 2.0)
    labels = np.array([rng.choice(5, p=row) for row in truth])
    fitted = fit_temperature(labels, softmax(logits))
    assert fitted == pytest.approx(2.0, rel=0.05)
    calibration = fit_calibration(labels, softmax(logits), source="synthetic")
    assert calibration["after"]["expected_calibration_error"] < 0.02
    assert calibration["before"]["expected_calibration_error"] > 0.05


def test_temperature_keeps_every_ranking():
    rng = np.random.default_rng(1)
    probabilities = softmax(rng.normal(0, 2, (100, 7)))
    for temperature in (0.3, 1.0, 4.0):
        scaled = temperature_scale(probabilities, temperature)
        assert np.allclose(scaled.sum(axis=1), 1)
        assert (scaled.argmax(axis=1) == probabilities.argmax(axis=1)).all()
    assert np.allclose(temperature_scale(probabilities, 1.0), probabilities, atol=1e-9)


def test_expected_confusion_matrix_by_hand():
    # Two answers of class 0 (calibrated rows below), one of class 1.
    calibrated = np.array([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    predicted = np.array([0, 0, 1])
    found = expected_scores(calibrated, predicted, ["a", "b"])
    # Expected matrix (rows true, columns predicted): [[1.4, 0.3], [0.6, 0.7]].
    assert found["accuracy"] == pytest.approx((1.4 + 0.7) / 3)
    assert found["per_class"]["a"]["precision"] == pytest.approx(1.4 / 2.0)
    assert found["per_class"]["a"]["recall"] == pytest.approx(1.4 / 1.7)
    assert found["per_class"]["b"]["precision"] == pytest.approx(0.7 / 1.0)
    assert found["per_class"]["b"]["recall"] == pytest.approx(0.7 / 1.3)


def test_rank_auc_matches_counting_pairs_with_ties():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 6, 60).astype(float)  # many ties
    target = (rng.random(60) < 0.4).astype(float)
    pairs = [
        1.0 if p > n else 0.5 if p == n else 0.0
        for p, n in itertools.product(scores[target == 1], scores[target == 0])
    ]
    assert rank_auc(scores, target) == pytest.approx(np.mean(pairs))


def test_domain_classifier_sees_a_shift_and_not_its_absence():
    rng = np.random.default_rng(3)
    reference = rng.normal(0, 1, (500, 16))
    same = rng.normal(0, 1, (400, 16))
    moved = rng.normal(0, 1, (400, 16)) + np.r_[0.6, np.zeros(15)]
    assert abs(domain_classifier_auc(reference, same) - 0.5) < 0.06
    assert domain_classifier_auc(reference, moved) > 0.6


def test_auc_thresholds_hold_their_false_alarm_rate_on_fresh_in_distribution_windows():
    rng = np.random.default_rng(4)
    population = rng.normal(0, 1, (20_000, 8))
    reference = population[:400]
    calibration = calibrate(reference, family_quantiles(1), sizes=(100, 200), replicates=60, seed=0)
    bounds = threshold_at(calibration, 200)
    assert 0.5 < bounds["warning"] < bounds["critical"] < 0.75
    warnings = [
        domain_classifier_auc(reference, population[400 + 200 * i : 600 + 200 * i], seed=i)
        > bounds["warning"]
        for i in range(40)
    ]
    assert sum(warnings) <= 2  # designed for 1 %; 40 windows allow a chance hit or two
    # Larger windows are less noisy: tighter thresholds.
    assert threshold_at(calibration, 1000)["warning"] < bounds["warning"]


def test_embedding_reference_round_trips_and_bounds_its_support():
    rng = np.random.default_rng(5)
    embeddings = rng.normal(3, 2, (300, 10))
    reference = EmbeddingReference.fit(embeddings)
    again = EmbeddingReference.from_bytes(_saved(reference))
    assert np.allclose(again.reference, reference.reference, atol=1e-5)
    assert again.support_radius == reference.support_radius
    inside = reference.outside_support(reference.reduce(rng.normal(3, 2, (500, 10))))
    far = reference.outside_support(reference.reduce(rng.normal(3, 2, (50, 10)) + 20))
    assert inside.mean() < 0.05 and far.all()
    # Wide embeddings are projected on their first components.
    wide = EmbeddingReference.fit(rng.normal(0, 1, (200, 100)))
    assert wide.reference.shape == (200, 64)


def test_outside_support_counts_at_chance():
    rng = np.random.default_rng(6)
    reference = EmbeddingReference.fit(rng.normal(0, 1, (300, 4)))
    estimator = LabelFreeEstimator({"temperature": 1.0}, reference)
    probabilities = softmax(np.array([[5.0, 0, 0, 0], [5.0, 0, 0, 0]]))
    reduced = reference.reduce(np.array([[0.0, 0, 0, 0], [50.0, 50, 50, 50]]))
    calibrated, outside = estimator.calibrate(probabilities, reduced)
    assert outside.tolist() == [False, True]
    expected = estimator.expected_correct(calibrated, probabilities)
    assert expected[0] == pytest.approx(probabilities[0].max())
    assert expected[1] == pytest.approx(0.25)


def test_distinct_counts_a_repeated_image_once():
    rows = np.array([[1.0, 2], [3, 4], [1, 2], [5, 6]])
    assert sorted(map(tuple, distinct(rows))) == [(1, 2), (3, 4), (5, 6)]
    assert len(distinct(rows, limit=2)) == 2


def test_the_store_audits_the_estimate_on_the_labelled_predictions(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite3", ["a", "b"], capacity=100, window=100)
    try:
        store.remember(["r1", "r2", "r3"], [0, 1, 0], 1, [0.9, 0.6, 0.3])
        store.remember(["r4"], [1], 1)  # answered without an estimate (an older model)
        store.label([("r1", "a"), ("r2", "a"), ("r3", "a"), ("r4", "b")])
        audit = store.summary(1)["estimate"]
    finally:
        store.close()
    assert audit["count"] == 3
    assert audit["estimated_accuracy"] == pytest.approx(0.6)
    assert audit["accuracy"] == pytest.approx(2 / 3)
    assert audit["gap"] == pytest.approx(abs(0.6 - 2 / 3))


def _saved(reference: EmbeddingReference) -> bytes:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "e.npz"
        reference.save(path)
        return path.read_bytes()
