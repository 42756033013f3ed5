"""The label-free accuracy estimate: calibrated probabilities summed into an expected
confusion matrix (NannyML's CBPE), inside the reference's support.

Calibration is temperature scaling (Guo et al., 2017), fitted at export on the validation
split by minimising the negative log-likelihood. One parameter: it cannot overfit the few
mistakes a good model makes on a few hundred held-out images (an isotonic map of the
top-1 confidence, NannyML's default, is a step function fitted to exactly those mistakes),
and it keeps the ranking and the predicted class of every image.

Calibration only holds where it was fitted. An image whose embedding lies outside the
reference's support (``monitoring.embedding``) is one the calibration has never seen: a
rotated digit is predicted with the confidence of a clean one and is wrong. Such an image
counts at chance, its probabilities uniform: the estimate does not claim what it cannot
know, and ``out_of_support`` says how much of the window that was.

Plain numpy; ``calibration.json`` in the model directory holds the fitted values.
"""

from __future__ import annotations

import numpy as np

from monitoring.embedding import EmbeddingReference

#: Temperatures searched (log-spaced), then refined around the best.
TEMPERATURES = np.exp(np.linspace(np.log(0.05), np.log(20.0), 241))


def temperature_scale(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T), which is p^(1/T) normalised: the logits are the log-probabilities
    up to a constant. Each row is first divided by its largest value, so that the power
    cannot underflow to an all-zero row."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    scaled = np.power(probabilities / probabilities.max(axis=1, keepdims=True), 1.0 / temperature)
    return scaled / scaled.sum(axis=1, keepdims=True)


def negative_log_likelihood(labels: np.ndarray, probabilities: np.ndarray) -> float:
    picked = probabilities[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)]
    return float(-np.log(np.clip(picked, 1e-12, 1.0)).mean())


def fit_temperature(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """The temperature of least negative log-likelihood (a grid, then a finer grid)."""

    def loss(temperature: float) -> float:
        return negative_log_likelihood(labels, temperature_scale(probabilities, temperature))

    best = min(TEMPERATURES, key=loss)
    finer = best * np.exp(np.linspace(-0.03, 0.03, 61))
    return float(min(finer, key=loss))


def expected_scores(calibrated: np.ndarray, predicted: np.ndarray, classes: list[str]) -> dict:
    """Accuracy and per-class precision and recall of the expected confusion matrix
    (rows: true class, expected from the calibrated probabilities; columns: predicted)."""
    count = len(predicted)
    size = len(classes)
    matrix = np.zeros((size, size))
    np.add.at(matrix.T, np.asarray(predicted, dtype=np.int64), calibrated)
    hits = np.diag(matrix)
    predicted_mass = matrix.sum(axis=0)
    true_mass = matrix.sum(axis=1)
    precision = np.divide(hits, predicted_mass, out=np.zeros(size), where=predicted_mass > 0)
    recall = np.divide(hits, true_mass, out=np.zeros(size), where=true_mass > 0)
    return {
        "accuracy": float(hits.sum() / count) if count else None,
        "count": count,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "predicted": int(predicted_mass[i].round()) if count else 0,
            }
            for i, name in enumerate(classes)
        },
    }


class LabelFreeEstimator:
    """Per image: calibrated probabilities (uniform outside the reference's support) and
    the expected correctness of its answer, the calibrated probability of the top-1 class."""

    def __init__(self, calibration: dict, support=None) -> None:
        self.calibration = calibration
        self.temperature = float(calibration["temperature"])
        #: ``monitoring.embedding.EmbeddingReference``, or None (no embedding output).
        self.support = support

    def calibrate(
        self, probabilities: np.ndarray, reduced_embeddings: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(calibrated probabilities, outside-support flags)`` for a batch."""
        calibrated = temperature_scale(probabilities, self.temperature)
        outside = np.zeros(len(calibrated), dtype=bool)
        if self.support is not None and reduced_embeddings is not None:
            outside = self.support.outside_support(reduced_embeddings)
            calibrated[outside] = 1.0 / calibrated.shape[1]
        return calibrated, outside

    @staticmethod
    def expected_correct(calibrated: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        """The calibrated probability of each answer (the raw top-1 class)."""
        predicted = np.asarray(probabilities).argmax(axis=1)
        return calibrated[np.arange(len(predicted)), predicted]


def monitoring_references(files) -> tuple[LabelFreeEstimator | None, EmbeddingReference | None]:
    """The label-free estimator and the embedding reference of a version, from its
    ``serving.core.model_dir.MonitoringFiles`` (``ClassifierRuntime.monitoring_files()``);
    None for what the version lacks."""
    embedding = (
        EmbeddingReference.from_arrays(files.embedding) if files.embedding is not None else None
    )
    estimator = (
        LabelFreeEstimator(files.calibration, embedding) if files.calibration is not None else None
    )
    return estimator, embedding


def fit_calibration(labels: np.ndarray, probabilities: np.ndarray, *, source: str) -> dict:
    """What ``calibration.json`` holds: the temperature and what it did on its own data."""
    from monitoring.performance import calibration as reliability

    temperature = fit_temperature(labels, probabilities)
    calibrated = temperature_scale(probabilities, temperature)
    accuracy = float((probabilities.argmax(axis=1) == labels).mean())
    return {
        "method": "temperature scaling (negative log-likelihood)",
        "temperature": temperature,
        "fitted_on": source,
        "samples": len(labels),
        "accuracy": accuracy,
        "before": {
            "negative_log_likelihood": negative_log_likelihood(labels, probabilities),
            "expected_calibration_error": reliability(labels, probabilities)["ece"],
            "mean_confidence": float(probabilities.max(axis=1).mean()),
        },
        "after": {
            "negative_log_likelihood": negative_log_likelihood(labels, calibrated),
            "expected_calibration_error": reliability(labels, calibrated)["ece"],
            "mean_confidence": float(calibrated.max(axis=1).mean()),
        },
        "outside_support": "uniform probabilities (chance) for images outside the "
        "reference's embedding support",
    }
