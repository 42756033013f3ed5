"""Drift thresholds calibrated on the reference: how far a window of in-distribution images
drifts by chance alone, per signal, statistic and window size.

A fixed PSI band cannot suit every signal: a 99 %-accurate model's confidence and entropy
pile up at one end, and the noise of a 500-prediction window is not the noise of a
10,000-prediction one. So at export we draw ``REPLICATES`` pairs (a reference of the
reference's size and a window of each size in ``WINDOW_SIZES``) from the reference's own
binned distribution, and keep high quantiles of each statistic. The quantiles are
Bonferroni-adjusted: with every statistic of every signal watched at once, at most
``FAMILY_WISE["warning"]`` of in-distribution windows raise any warning, and
``FAMILY_WISE["critical"]`` any critical.

A window is not drawn from the reference's distribution itself, though, but from the
population the reference is one sample of, and real traffic repeats itself: a window of
ten thousand predictions may hold a few hundred distinct images. Each simulated window is
therefore drawn in two stages: a pool of ``samples`` distinct images (the reference's size)
from the population, then the window from that pool with replacement. That models the
reference's own sampling error twice over (reference and pool), and keeps a large window
of repeated images as noisy as the images it repeats. Without the second stage, windows of
held-out images that are not in the reference raised a warning in 3.5 % to 6 % of windows
instead of the 1 % designed for (docs/monitoring.md).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from monitoring.statistics import js_distance, ks_from_cdfs, psi

STATISTICS = ("psi", "js_distance", "ks")
LEVELS = ("warning", "critical")
WINDOW_SIZES = (50, 100, 200, 500, 1000, 2000, 5000, 10000)
REPLICATES = 10_000
FAMILY_WISE = {"warning": 0.01, "critical": 0.001}
#: The rules of thumb, for ``IMGCLF_DRIFT_THRESHOLDS=fixed`` and profiles without
#: calibrated thresholds: PSI 0.1 / 0.25; 0.1 is Evidently's Jensen-Shannon default.
FIXED_BANDS = {
    "psi": {"warning": 0.1, "critical": 0.25},
    "js_distance": {"warning": 0.1, "critical": 0.2},
    "ks": {"warning": 0.1, "critical": 0.2},
}
MODES = ("calibrated", "fixed")


def statistics_of(signal: str) -> tuple[str, ...]:
    """The class mix has no order, so no KS; the continuous signals have all three."""
    return ("psi", "js_distance") if signal == "class" else STATISTICS


def _distributions(profile: dict) -> dict[str, dict[str, np.ndarray]]:
    """Per signal, the reference distributions the statistics compare: bin fractions, and
    for KS the probability of each group of values between the reference's KS points."""
    found = {"class": {"bins": np.asarray(profile["class_distribution"])}}
    for name, reference in profile["signals"].items():
        cdf = np.asarray(reference["ks_cdf"])
        found[name] = {
            "bins": np.asarray(reference["bin_fractions"]),
            "ks": np.diff(np.concatenate([[0.0], cdf])),
        }
    return found


def _draw(rng: np.random.Generator, count: int, probabilities: np.ndarray, replicates: int):
    probabilities = np.clip(probabilities, 0, None)
    return rng.multinomial(count, probabilities / probabilities.sum(), size=replicates) / count


def _draw_windows(rng: np.random.Generator, count: int, pools: np.ndarray) -> np.ndarray:
    """Windows of ``count`` predictions, each repeating the images of its pool (one pool
    per replicate: the fractions of a pool of distinct images drawn from the population)."""
    return rng.multinomial(count, pools) / count


def family_quantiles(tested: int) -> dict[str, float]:
    """Each level's per-statistic quantile when ``tested`` statistics are watched at once."""
    return {level: 1 - rate / tested for level, rate in FAMILY_WISE.items()}


def calibrate(
    profile: dict,
    *,
    replicates: int = REPLICATES,
    window_sizes: tuple[int, ...] = WINDOW_SIZES,
    seed: int = 0,
) -> dict:
    """Thresholds for every signal and statistic at every window size (see the module).
    Each signal draws from its own random stream (spawned from ``seed``, so the result does
    not depend on scheduling), on a thread of its own: NumPy's samplers release the GIL, and
    this was a third of an export's time."""
    tested = sum(len(statistics_of(signal)) for signal in ("class", *profile["signals"]))
    # The embedding's statistic (monitoring.embedding) is one more in the family.
    quantiles = family_quantiles(tested + 1)
    distributions = _distributions(profile)
    streams = np.random.SeedSequence(seed).spawn(len(distributions))

    def signal_values(signal: str, stream: np.random.SeedSequence) -> dict:
        return _signal_values(
            np.random.default_rng(stream),
            distributions[signal],
            statistics_of(signal),
            profile["samples"],
            window_sizes,
            replicates,
            quantiles,
        )

    with ThreadPoolExecutor(min(len(distributions), os.cpu_count() or 1)) as pool:
        values = dict(
            zip(distributions, pool.map(signal_values, distributions, streams), strict=True)
        )
    return {
        "method": "two-sample bootstrap from the reference's binned distribution; windows "
        "repeat a pool of the reference's size",
        "pool": profile["samples"],
        "replicates": replicates,
        "window_sizes": list(window_sizes),
        "family_wise": dict(FAMILY_WISE),
        "quantiles": quantiles,
        "values": values,
    }


def _signal_values(
    rng: np.random.Generator,
    distributions: dict[str, np.ndarray],
    statistics: tuple[str, ...],
    reference_size: int,
    window_sizes: tuple[int, ...],
    replicates: int,
    quantiles: dict[str, float],
) -> dict:
    """One signal's thresholds: ``{statistic: {level: [value per window size]}}``."""
    values = {stat: {level: [] for level in LEVELS} for stat in statistics}
    bins = distributions["bins"]
    references = _draw(rng, reference_size, bins, replicates)
    # One pool per replicate serves every window size, as one reference does: each size's
    # statistics keep their distribution, and the pools were half of the draws.
    pools = _draw(rng, reference_size, bins, replicates)
    reference_cdfs = None
    if "ks" in distributions:
        groups = distributions["ks"]
        reference_cdfs = np.cumsum(_draw(rng, reference_size, groups, replicates), axis=1)
        group_pools = _draw(rng, reference_size, groups, replicates)
    for size in window_sizes:
        windows = _draw_windows(rng, size, pools)
        drawn = {
            "psi": psi(references, windows),
            "js_distance": js_distance(references, windows),
        }
        if reference_cdfs is not None:
            window_cdfs = np.cumsum(_draw_windows(rng, size, group_pools), axis=1)
            drawn["ks"] = ks_from_cdfs(reference_cdfs, window_cdfs)
        for stat, statistic in drawn.items():
            for level, quantile in quantiles.items():
                values[stat][level].append(float(np.quantile(statistic, quantile)))
    return values


def thresholds_at(profile: dict, samples: int, mode: str = "calibrated") -> tuple[str, dict]:
    """The thresholds for a window of ``samples`` predictions: ``(mode used, {signal:
    {statistic: {level: value}}})``. Calibrated values are interpolated between window sizes
    (log scale) and held at the ends; a profile without them gets the fixed bands."""
    signals = ("class", *profile["signals"])
    calibrated = profile.get("thresholds")
    if mode == "fixed" or calibrated is None:
        used = "fixed" if mode == "fixed" else "fixed (the profile has no calibrated thresholds)"
        return used, {
            signal: {stat: dict(FIXED_BANDS[stat]) for stat in statistics_of(signal)}
            for signal in signals
        }
    sizes = np.log(np.asarray(calibrated["window_sizes"], dtype=np.float64))
    where = np.log(max(samples, 1))
    return "calibrated", {
        signal: {
            stat: {
                level: float(np.interp(where, sizes, calibrated["values"][signal][stat][level]))
                for level in LEVELS
            }
            for stat in statistics_of(signal)
        }
        for signal in signals
    }


def level_of(value: float, bounds: dict[str, float]) -> str:
    if value > bounds["critical"]:
        return "critical"
    return "warning" if value > bounds["warning"] else "stable"


def worst(levels) -> str:
    order = ("stable", "warning", "critical")
    return max(levels, key=order.index, default="stable")
