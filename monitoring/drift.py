"""Prediction drift: per-image signals, the reference profile, PSI / Jensen-Shannon / KS.

Plain numpy, no TensorFlow and no SciPy, so the service, batch scoring and the export step
share it. The reference comes from held-out images; a live (or offline) window is compared
with it signal by signal.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np

#: Continuous per-image signals; the class distribution is handled separately.
CONTINUOUS_SIGNALS = ("confidence", "entropy", "brightness", "contrast")
SIGNALS = ("class", *CONTINUOUS_SIGNALS)
DEFAULT_BINS = 10
#: Reference values kept per signal for the KS statistic (exact below this many samples).
REFERENCE_QUANTILES = 2000
PSI_EPSILON = 1e-4
#: The usual PSI bands: below 0.1 stable, 0.1-0.25 moderate, above 0.25 significant.
PSI_WARNING = 0.1
PSI_CRITICAL = 0.25


def image_signals(images: np.ndarray, probabilities: np.ndarray) -> dict[str, np.ndarray]:
    """Per image: predicted class, top-1 confidence, entropy (nats), brightness and contrast
    (mean and standard deviation of the model input, as fractions of 255)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    flat = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
    clipped = np.clip(probabilities, 1e-12, 1.0)
    return {
        "class": probabilities.argmax(axis=1),
        "confidence": probabilities.max(axis=1),
        "entropy": -(probabilities * np.log(clipped)).sum(axis=1),
        "brightness": flat.mean(axis=1) / 255.0,
        "contrast": flat.std(axis=1) / 255.0,
    }


def psi(expected: np.ndarray, actual: np.ndarray, epsilon: float = PSI_EPSILON) -> float:
    """Population stability index of two distributions over the same bins (fractions)."""
    expected = np.clip(np.asarray(expected, dtype=np.float64), epsilon, None)
    actual = np.clip(np.asarray(actual, dtype=np.float64), epsilon, None)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) of two discrete distributions."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / b[mask])))

    return float(np.sqrt(max(0.5 * kl(p, m) + 0.5 * kl(q, m), 0.0)))


def ks_statistic(reference: np.ndarray, sample: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    reference = np.sort(np.asarray(reference, dtype=np.float64))
    sample = np.sort(np.asarray(sample, dtype=np.float64))
    points = np.concatenate([reference, sample])
    cdf_reference = np.searchsorted(reference, points, side="right") / len(reference)
    cdf_sample = np.searchsorted(sample, points, side="right") / len(sample)
    return float(np.max(np.abs(cdf_reference - cdf_sample)))


def bin_fractions(values: np.ndarray, interior_edges: np.ndarray) -> np.ndarray:
    """Fractions of ``values`` in the bins that ``interior_edges`` cut (outer bins open)."""
    counts = np.bincount(
        np.searchsorted(interior_edges, values, side="right"), minlength=len(interior_edges) + 1
    )
    return counts / max(len(values), 1)


def class_fractions(classes: np.ndarray, num_classes: int) -> np.ndarray:
    counts = np.bincount(np.asarray(classes, dtype=np.int64), minlength=num_classes)
    return counts / max(len(classes), 1)


def build_reference_profile(
    signals: dict[str, np.ndarray], classes: list[str], *, source: str, bins: int = DEFAULT_BINS
) -> dict:
    """What "no drift" looks like: class mix, and for each continuous signal the bin edges at
    reference quantiles, the reference fractions in those bins, and its quantiles for KS."""
    samples = len(signals["class"])
    profile = {
        "source": source,
        "samples": samples,
        "classes": classes,
        "bins": bins,
        "class_distribution": class_fractions(signals["class"], len(classes)).tolist(),
        "signals": {},
    }
    for name in CONTINUOUS_SIGNALS:
        values = np.asarray(signals[name], dtype=np.float64)
        interior = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
        kept = min(samples, REFERENCE_QUANTILES)
        profile["signals"][name] = {
            "bin_edges": interior.tolist(),
            "bin_fractions": bin_fractions(values, interior).tolist(),
            "quantiles": np.quantile(values, np.linspace(0, 1, kept)).tolist(),
            "mean": float(values.mean()),
        }
    return profile


def compare(profile: dict, signals: dict[str, np.ndarray]) -> dict:
    """Drift of a window (``image_signals`` output) against a reference profile."""
    count = len(signals["class"])
    observed = class_fractions(signals["class"], len(profile["classes"]))
    report = {
        "samples": count,
        "reference_samples": profile["samples"],
        "signals": {
            "class": {
                "psi": psi(profile["class_distribution"], observed),
                "js_distance": js_distance(profile["class_distribution"], observed),
                "distribution": dict(zip(profile["classes"], observed.tolist(), strict=True)),
            }
        },
    }
    for name in CONTINUOUS_SIGNALS:
        reference = profile["signals"][name]
        values = np.asarray(signals[name], dtype=np.float64)
        edges = np.asarray(reference["bin_edges"])
        report["signals"][name] = {
            "psi": psi(reference["bin_fractions"], bin_fractions(values, edges)),
            "ks": ks_statistic(np.asarray(reference["quantiles"]), values),
            "mean": float(values.mean()),
            "reference_mean": reference["mean"],
        }
    worst = max(signal["psi"] for signal in report["signals"].values())
    report["max_psi"] = worst
    report["status"] = (
        "critical" if worst > PSI_CRITICAL else "warning" if worst > PSI_WARNING else "stable"
    )
    return report


def load_profile(path: Path) -> dict:
    return json.loads(Path(path).read_text())


class DriftMonitor:
    """A ring buffer of the last ``window`` predictions' signals.

    ``add`` is O(1) per prediction (a slice write under a short lock); ``compute`` copies the
    window and does the maths outside the lock, so requests never wait for it.
    """

    def __init__(self, profile: dict, *, window: int = 1000, min_samples: int = 500) -> None:
        if min_samples > window:
            raise ValueError(f"min_samples ({min_samples}) cannot exceed the window ({window})")
        self.profile = profile
        self.window = window
        self.min_samples = min_samples
        self._values = {name: np.zeros(window, dtype=np.float64) for name in SIGNALS}
        self._next = 0
        self._count = 0
        self._lock = threading.Lock()
        self.last_report: dict | None = None
        self.last_computed: float | None = None

    @property
    def samples(self) -> int:
        return self._count

    def add(self, signals: dict[str, np.ndarray]) -> None:
        size = len(signals["class"])
        if size == 0:
            return
        if size > self.window:  # keep the newest
            signals = {name: values[-self.window :] for name, values in signals.items()}
            size = self.window
        with self._lock:
            positions = (self._next + np.arange(size)) % self.window
            for name in SIGNALS:
                self._values[name][positions] = signals[name]
            self._next = (self._next + size) % self.window
            self._count = min(self._count + size, self.window)

    def snapshot(self) -> dict[str, np.ndarray]:
        with self._lock:
            count = self._count
            return {name: values[:count].copy() for name, values in self._values.items()}

    def compute(self) -> dict | None:
        """Compare the current window with the reference; None below ``min_samples``."""
        window = self.snapshot()
        if len(window["class"]) < self.min_samples:
            return None
        window["class"] = window["class"].astype(np.int64)
        report = compare(self.profile, window)
        self.last_report = report
        self.last_computed = time.time()
        return report
