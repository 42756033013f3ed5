"""Evaluation: the numbers in a run's ``metrics.json``, and ``imgclf evaluate`` of a published
model on labelled images through the serving runtime and preprocessing (the way production
sees it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from monitoring.performance import calibration, confusion, scores

__all__ = ["calibration", "classification_report", "evaluate_published"]


def classification_report(
    true_labels: np.ndarray, probabilities: np.ndarray, classes: list[str]
) -> dict:
    """Accuracy, macro precision/recall/F1, one-vs-rest macro ROC AUC and per-class scores."""
    indices = list(range(len(classes)))
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
    matrix = confusion(true_labels, probabilities.argmax(axis=1), len(classes))
    return {**scores(matrix, classes), "macro_auc": auc}


def evaluate_published(model_dir: Path, samples: list, output: Path) -> dict:
    """Score labelled ``samples`` with the published ONNX model through ``ClassifierRuntime``
    and the serving preprocessing; write ``evaluation.json`` and the plots into ``output``.
    Unreadable files are counted and skipped."""
    from serving.batch.engine import score_paths
    from serving.core.errors import DataError
    from serving.core.files import write_json
    from serving.core.runtime import ClassifierRuntime
    from training import plots

    runtime = ClassifierRuntime(model_dir, provider="cpu")
    index = {name: i for i, name in enumerate(runtime.classes)}
    unknown = sorted({s.label for s in samples} - set(index))
    if unknown:
        raise DataError(
            f"class folder(s) {', '.join(unknown[:5])} are not classes of "
            f"{runtime.name} v{runtime.version} ({', '.join(runtime.classes[:10])})"
        )
    labels = {str(s.path): index[s.label] for s in samples}
    true, rows, unreadable = [], [], []
    for chunk in score_paths(runtime, [str(s.path) for s in samples]):
        for item in chunk:
            if item.error is not None:
                unreadable.append({"path": item.path, "error": item.error})
            else:
                true.append(labels[item.path])
                rows.append(item.probabilities)
    if not rows:
        raise DataError("no image could be read; nothing to evaluate")
    true_labels, probabilities = np.asarray(true), np.stack(rows)
    report = classification_report(true_labels, probabilities, runtime.classes)
    reliability = calibration(true_labels, probabilities)
    result = {
        "model": {"name": runtime.name, "version": runtime.version, "dir": str(runtime.model_dir)},
        **report,
        "calibration": reliability,
        "unreadable_count": len(unreadable),
        "unreadable": unreadable[:100],
    }
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "evaluation.json", result)
    plots.plot_confusion_matrix(
        report["confusion_matrix"], runtime.classes, output / "confusion_matrix.png"
    )
    plots.plot_roc_curves(true_labels, probabilities, runtime.classes, output / "roc_curves.png")
    plots.plot_reliability(reliability, output / "reliability.png")
    return result
