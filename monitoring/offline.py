"""Offline drift reports: the signals of a whole batch job, compared with the reference.

Fed by its callers (``serving.batch.engine.drift_report`` for ``imgclf drift``,
``serving.batch.job`` for batch scoring): monitoring never imports serving."""

from __future__ import annotations

import numpy as np

from monitoring.drift import SIGNALS, compare, embedding_drift, image_signals
from monitoring.embedding import MAX_WINDOW, EmbeddingReference
from monitoring.thresholds import WINDOW_SIZES, worst

#: Fewer images than the smallest window the thresholds are calibrated for are not judged:
#: five images would be "critical" on every signal by chance alone.
MIN_JUDGED = WINDOW_SIZES[0]


class SignalCollector:
    """Keeps the five drift signals of every scored image (a few numbers each), so the report
    for a whole job costs little memory; and, with the model's ``embedding`` reference, the
    reduced embeddings of a uniform sample of at most ``MAX_WINDOW`` of them."""

    def __init__(self, embedding: EmbeddingReference | None = None, seed: int = 0) -> None:
        self.parts: dict[str, list[np.ndarray]] = {name: [] for name in SIGNALS}
        self.embedding = embedding
        #: The reservoir (filled up to ``_filled`` rows) and how many embeddings it has seen.
        self._reservoir: np.ndarray | None = None
        self._filled = 0
        self._seen = 0
        self._rng = np.random.default_rng(seed)

    def add(
        self,
        images: np.ndarray,
        probabilities: np.ndarray,
        embeddings: np.ndarray | None = None,
    ) -> None:
        self.extend(image_signals(images, probabilities))
        if embeddings is not None:
            self.add_embeddings(embeddings)

    def add_embeddings(self, embeddings: np.ndarray) -> None:
        """Reservoir-sample the reduced embeddings (Algorithm R): memory stays flat."""
        if self.embedding is None or len(embeddings) == 0:
            return
        reduced = self.embedding.reduce(embeddings)
        if self._reservoir is None:
            self._reservoir = np.zeros((MAX_WINDOW, reduced.shape[1]))
        for row in reduced:
            self._seen += 1
            if self._filled < MAX_WINDOW:
                self._reservoir[self._filled] = row
                self._filled += 1
            else:
                slot = self._rng.integers(0, self._seen)
                if slot < MAX_WINDOW:
                    self._reservoir[slot] = row

    def extend(self, signals: dict[str, np.ndarray]) -> None:
        """Signals computed earlier (a score file's columns, say)."""
        for name, values in signals.items():
            self.parts[name].append(values)

    def signals(self) -> dict[str, np.ndarray]:
        return {
            name: np.concatenate(parts) if parts else np.zeros(0)
            for name, parts in self.parts.items()
        }

    def report(self, profile: dict, **context) -> dict:
        signals = self.signals()
        if len(signals["class"]) == 0:
            return {**context, "samples": 0, "status": "no images scored", "signals": {}}
        signals["class"] = signals["class"].astype(np.int64)
        found = compare(profile, signals)
        if self._filled and "embedding" in profile:
            sample = self._reservoir[: self._filled]
            found["embedding"] = embedding_drift(profile, self.embedding.reference, sample)
            found["embedding"]["sampled_from"] = self._seen
            found["status"] = worst([found["status"], found["embedding"]["level"]])
        if found["samples"] < MIN_JUDGED:
            for values in [*found["signals"].values(), found.get("embedding") or {}]:
                values["level"] = "not judged"
            found["status"] = f"too few images to judge ({found['samples']} < {MIN_JUDGED})"
        return {**context, **found}


SHOWN = (("psi", "PSI"), ("js_distance", "JS"), ("ks", "KS"))


def format_report(report: dict) -> str:
    """One line per signal: its level, and each statistic over its critical threshold."""
    lines = [
        f"{report.get('samples', 0)} images scored against "
        f"{report.get('reference_samples', '?')} reference images: {report['status']} "
        f"(thresholds: {report.get('thresholds', '?')}; each statistic / its critical threshold)"
    ]
    for name, values in report.get("signals", {}).items():
        bounds = values.get("thresholds", {})
        shown = "   ".join(
            f"{label} {values[key]:.3f} / {bounds[key]['critical']:.3f}"
            for key, label in SHOWN
            if key in values and key in bounds
        )
        lines.append(f"  {name:<11} {values.get('level', ''):<9} {shown}")
    embedding = report.get("embedding")
    if embedding:
        lines.append(
            f"  {'embedding':<11} {embedding['level']:<9} "
            f"AUC {embedding['domain_classifier_auc']:.3f} / "
            f"{embedding['thresholds']['critical']:.3f}   "
            f"({embedding['distinct_samples']} distinct of {embedding['sampled_from']} images)"
        )
    if report.get("failed"):
        lines.append(f"  {len(report['failed'])} file(s) could not be read")
    return "\n".join(lines)
