"""Plots a person looks at after a run or an evaluation: learning curves, confusion matrix, ROC
curves, reliability diagram."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay


def plot_training_curves(history_csv: Path, output: Path) -> None:
    with Path(history_csv).open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    epochs = [int(r["epoch"]) + 1 for r in rows]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, metric in zip(axes, ("loss", "accuracy"), strict=True):
        for prefix, label in (("", "train"), ("val_", "validation")):
            values = [float(r[prefix + metric]) for r in rows if r.get(prefix + metric)]
            axis.plot(epochs[: len(values)], values, marker=".", label=label)
        axis.set_title(metric)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    _save(figure, output)


def plot_confusion_matrix(matrix: list[list[int]], classes: list[str], output: Path) -> None:
    size = max(5, 0.6 * len(classes) + 2)
    figure, axis = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=classes).plot(
        ax=axis, cmap="Blues", colorbar=False, xticks_rotation=45
    )
    axis.set_title("test set confusion matrix")
    figure.tight_layout()
    _save(figure, output)


def plot_roc_curves(
    true_labels: np.ndarray, probabilities: np.ndarray, classes: list[str], output: Path
) -> None:
    figure, axis = plt.subplots(figsize=(6, 6))
    for index, name in enumerate(classes):
        positives = true_labels == index
        if positives.all() or not positives.any():
            continue
        RocCurveDisplay.from_predictions(
            positives, probabilities[:, index], name=name, ax=axis, plot_chance_level=index == 0
        )
    axis.set_title("test set ROC, one vs rest")
    axis.legend(fontsize="small", loc="lower right")
    figure.tight_layout()
    _save(figure, output)


def plot_reliability(calibration: dict, output: Path) -> None:
    """Accuracy against confidence per bin: a calibrated model follows the diagonal."""
    bins = [b for b in calibration["bins"] if b["count"]]
    figure, axis = plt.subplots(figsize=(6, 6))
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    width = 1.0 / len(calibration["bins"])
    axis.bar(
        [b["lower"] for b in bins],
        [b["accuracy"] for b in bins],
        width=width,
        align="edge",
        edgecolor="black",
        alpha=0.7,
        label="accuracy in bin",
    )
    axis.plot(
        [b["confidence"] for b in bins],
        [b["accuracy"] for b in bins],
        "o-",
        label="mean confidence",
    )
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1)
    axis.set_xlabel("top-1 confidence")
    axis.set_ylabel("accuracy")
    axis.set_title(f"reliability, expected calibration error {calibration['ece']:.4f}")
    axis.legend(loc="upper left")
    figure.tight_layout()
    _save(figure, output)


def _save(figure, output: Path) -> None:
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.stem}.partial{output.suffix}")
    figure.savefig(partial, dpi=110)
    plt.close(figure)
    partial.replace(output)
