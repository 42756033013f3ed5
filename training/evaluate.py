"""Test-set evaluation of the best checkpoint: the numbers in ``metrics.json`` and the plots."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)


def classification_report(
    true_labels: np.ndarray, probabilities: np.ndarray, classes: list[str]
) -> dict:
    """Accuracy, macro precision/recall/F1, one-vs-rest macro ROC AUC and per-class scores."""
    predicted = probabilities.argmax(axis=1)
    indices = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        true_labels, predicted, labels=indices, zero_division=0
    )
    try:
        auc = float(
            roc_auc_score(
                true_labels, probabilities, multi_class="ovr", average="macro", labels=indices
            )
            if len(classes) > 2
            else roc_auc_score(true_labels, probabilities[:, 1])
        )
    except ValueError:  # a class absent from the test split has no ROC curve
        auc = None
    return {
        "accuracy": float(accuracy_score(true_labels, predicted)),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "macro_auc": auc,
        "count": len(true_labels),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(true_labels, predicted, labels=indices).tolist(),
    }
