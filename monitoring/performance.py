"""Model performance figures from labels and probabilities: accuracy, per-class precision,
recall and F1 from a confusion matrix, calibration (expected calibration error), and the
label-free estimate audited against the labels.

Plain numpy: ``imgclf evaluate``, the export step (held-out performance in the reference
profile) and the service's delayed-label feedback (the figures of its labelled window,
``labelled_figures``) all compute them here.
"""

from __future__ import annotations

import numpy as np

#: Above this expected calibration error, mean confidence is no estimate of accuracy.
CALIBRATION_TOLERANCE = 0.05


def confusion(true_labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class; columns: predicted class."""
    pairs = np.asarray(true_labels, dtype=np.int64) * num_classes + np.asarray(predicted)
    return np.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def scores(matrix: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, macro and per-class precision / recall / F1 of a confusion matrix.

    Per class, 0 where a class was never predicted or never seen (scikit-learn's
    ``zero_division=0``). The macro figures average over the classes that have labels
    (support > 0) only: ten labels of one class, all correct, are a macro precision of 1,
    not 0.1. With no labels at all, accuracy and the macro figures are None, not 0.
    """
    matrix = np.asarray(matrix, dtype=np.int64)
    hits = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
    count = int(matrix.sum())
    labelled = support > 0

    def macro(values: np.ndarray) -> float | None:
        return float(values[labelled].mean()) if labelled.any() else None

    return {
        "accuracy": float(hits.sum() / count) if count else None,
        "macro_precision": macro(precision),
        "macro_recall": macro(recall),
        "macro_f1": macro(f1),
        "count": count,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": matrix.tolist(),
    }


def calibration(true_labels: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> dict:
    """Expected calibration error over equal-width confidence bins, and the bins."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == true_labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    table, ece = [], 0.0
    for index in range(bins):
        members = which == index
        count = int(members.sum())
        accuracy = float(correct[members].mean()) if count else None
        mean_confidence = float(confidence[members].mean()) if count else None
        if count:
            ece += count / len(true_labels) * abs(accuracy - mean_confidence)
        table.append(
            {
                "lower": float(edges[index]),
                "upper": float(edges[index + 1]),
                "count": count,
                "accuracy": accuracy,
                "confidence": mean_confidence,
            }
        )
    return {"ece": float(ece), "bins": table, "mean_confidence": float(confidence.mean())}


def held_out_performance(true_labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """What the reference profile records for the label-free estimate: held-out accuracy,
    mean top-1 confidence, the calibration error, and whether the one can stand for the other."""
    reliability = calibration(np.asarray(true_labels), np.asarray(probabilities))
    accuracy = float((np.asarray(probabilities).argmax(axis=1) == true_labels).mean())
    calibrated = reliability["ece"] <= CALIBRATION_TOLERANCE
    return {
        "samples": len(true_labels),
        "accuracy": accuracy,
        "mean_confidence": reliability["mean_confidence"],
        "expected_calibration_error": reliability["ece"],
        "calibrated": calibrated,
        "note": (
            f"calibration error {reliability['ece']:.3f}: the window's mean confidence "
            "estimates its accuracy"
            if calibrated
            else f"calibration error {reliability['ece']:.3f} exceeds "
            f"{CALIBRATION_TOLERANCE}: mean confidence is not a reliable accuracy estimate for "
            "this model; rely on labelled feedback"
        ),
    }


def labelled_figures(rows: list[tuple], classes: list[str], version: int | None = None) -> dict:
    """The delayed-label feedback's figures of labelled predictions, each row (true class,
    predicted class, version that predicted, the label-free estimate's expected correctness
    or None): ``scores`` and the estimate's audit of ``version``'s rows (of all, when None),
    and the labelled and correct predictions of every version."""
    triples = np.asarray([row[:3] for row in rows], dtype=np.int64).reshape(-1, 3)
    expected = np.asarray([np.nan if row[3] is None else row[3] for row in rows], dtype=np.float64)
    by_version = {
        str(v): {
            "labelled": int((triples[:, 2] == v).sum()),
            "correct": int(((triples[:, 2] == v) & (triples[:, 0] == triples[:, 1])).sum()),
        }
        for v in sorted(set(triples[:, 2].tolist()))
    }
    if version is not None:
        chosen = triples[:, 2] == version
        triples, expected = triples[chosen], expected[chosen]
    matrix = confusion(triples[:, 0], triples[:, 1], len(classes))
    return {
        **scores(matrix, classes),
        "estimate": estimate_audit(triples, expected),
        "by_version": by_version,
    }


def estimate_audit(triples: np.ndarray, expected: np.ndarray) -> dict:
    """The label-free estimate against the labels, over the labelled predictions that were
    answered with an estimate: mean expected correctness, realised accuracy, their gap."""
    known = ~np.isnan(expected)
    count = int(known.sum())
    if count == 0:
        return {"count": 0, "estimated_accuracy": None, "accuracy": None, "gap": None}
    estimated = float(expected[known].mean())
    realised = float((triples[known, 0] == triples[known, 1]).mean())
    return {
        "count": count,
        "estimated_accuracy": estimated,
        "accuracy": realised,
        "gap": abs(estimated - realised),
    }
