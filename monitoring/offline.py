"""Offline drift reports: the signals of a whole batch job, compared with the reference.

Fed by the caller (``serving.batch.drift_report``, batch scoring): monitoring never imports
serving."""

from __future__ import annotations

import numpy as np

from monitoring.drift import SIGNALS, compare, image_signals
from monitoring.thresholds import WINDOW_SIZES

#: Fewer images than the smallest window the thresholds are calibrated for are not judged:
#: five images would be "critical" on every signal by chance alone.
MIN_JUDGED = WINDOW_SIZES[0]


class SignalCollector:
    """Keeps the five drift signals of every scored image (a few numbers each), so the report
    for a whole job costs little memory."""

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {name: [] for name in SIGNALS}

    def add(self, images: np.ndarray, probabilities: np.ndarray) -> None:
        self.extend(image_signals(images, probabilities))

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
        if found["samples"] < MIN_JUDGED:
            for values in found["signals"].values():
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
    if report.get("failed"):
        lines.append(f"  {len(report['failed'])} file(s) could not be read")
    return "\n".join(lines)
