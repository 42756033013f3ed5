"""The drift statistics: PSI, Jensen-Shannon distance and Kolmogorov-Smirnov.

Each takes distributions along the last axis, so the same code scores one live window and
ten thousand bootstrap windows (rows of a matrix) in the threshold calibration.
"""

from __future__ import annotations

import numpy as np

PSI_EPSILON = 1e-4


def _scalar_or_rows(result: np.ndarray) -> float | np.ndarray:
    return float(result) if result.ndim == 0 else result


def psi(expected: np.ndarray, actual: np.ndarray, epsilon: float = PSI_EPSILON):
    """Population stability index of distributions over the same bins (fractions); an empty
    bin is floored at ``epsilon`` instead of dividing by zero."""
    expected = np.clip(np.asarray(expected, dtype=np.float64), epsilon, None)
    actual = np.clip(np.asarray(actual, dtype=np.float64), epsilon, None)
    return _scalar_or_rows(np.sum((actual - expected) * np.log(actual / expected), axis=-1))


def js_distance(p: np.ndarray, q: np.ndarray):
    """Jensen-Shannon distance (base 2, in [0, 1]) of discrete distributions."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p = p / p.sum(axis=-1, keepdims=True)
    q = q / q.sum(axis=-1, keepdims=True)
    m = (p + q) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        ratio = np.divide(a, b, out=np.ones_like(a), where=a > 0)
        return np.sum(a * np.log2(ratio), axis=-1)

    return _scalar_or_rows(np.sqrt(np.maximum(0.5 * kl(p, m) + 0.5 * kl(q, m), 0.0)))


def ks_statistic(reference: np.ndarray, sample: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    reference = np.sort(np.asarray(reference, dtype=np.float64))
    sample = np.sort(np.asarray(sample, dtype=np.float64))
    points = np.concatenate([reference, sample])
    cdf_reference = np.searchsorted(reference, points, side="right") / len(reference)
    cdf_sample = np.searchsorted(sample, points, side="right") / len(sample)
    return float(np.max(np.abs(cdf_reference - cdf_sample)))


def ks_from_cdfs(reference_cdf: np.ndarray, sample_cdf: np.ndarray):
    """KS statistic of two CDFs evaluated at the same points (rows give one value each)."""
    return _scalar_or_rows(np.max(np.abs(np.asarray(reference_cdf) - sample_cdf), axis=-1))


def ks_at_points(points: np.ndarray, reference_cdf: np.ndarray, sample: np.ndarray) -> float:
    """KS statistic at the reference's ``points``, where the calibration evaluates it too."""
    sample = np.sort(np.asarray(sample, dtype=np.float64))
    cdf_sample = np.searchsorted(sample, points, side="right") / max(len(sample), 1)
    return ks_from_cdfs(reference_cdf, cdf_sample)
