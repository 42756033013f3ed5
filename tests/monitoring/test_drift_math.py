"""The drift maths against values computed by hand, and the monitor's window."""

from __future__ import annotations

import math

import numpy as np
import pytest

from monitoring.drift import (
    RESOLUTION,
    DriftMonitor,
    bin_fractions,
    build_reference_profile,
    compare,
    image_signals,
    js_distance,
    ks_statistic,
    psi,
    quantize,
    saturating_edges,
)
from monitoring.thresholds import calibrate, thresholds_at


def test_psi_by_hand():
    # (0.25-0.5)*ln(0.25/0.5) + (0.75-0.5)*ln(0.75/0.5)
    expected = -0.25 * math.log(0.5) + 0.25 * math.log(1.5)
    assert psi([0.5, 0.5], [0.25, 0.75]) == pytest.approx(expected)
    assert psi([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == 0.0
    assert psi([0.5, 0.5], [0.25, 0.75]) == pytest.approx(psi([0.25, 0.75], [0.5, 0.5]))
    # an empty bin is floored at 1e-4 instead of dividing by zero
    floored = (1e-4 - 0.5) * math.log(1e-4 / 0.5) + (1.0 - 0.5) * math.log(1.0 / 0.5)
    assert psi([0.5, 0.5], [0.0, 1.0]) == pytest.approx(floored)


def test_jensen_shannon_distance_by_hand():
    assert js_distance([1, 0], [0, 1]) == pytest.approx(1.0)
    assert js_distance([0.3, 0.7], [0.3, 0.7]) == 0.0
    # p=(1/2,1/2), q=(1,0): m=(3/4,1/4); KL(p||m)=1/2 log2(2/3)+1/2 log2(2); KL(q||m)=log2(4/3)
    kl_p = 0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)
    kl_q = math.log2(1 / 0.75)
    assert js_distance([0.5, 0.5], [1, 0]) == pytest.approx(math.sqrt(0.5 * kl_p + 0.5 * kl_q))
    assert js_distance([2, 2], [4, 0]) == pytest.approx(js_distance([0.5, 0.5], [1, 0]))


def test_ks_statistic_by_hand():
    assert ks_statistic([1, 2, 3], [4, 5, 6]) == 1.0
    assert ks_statistic([1, 2, 3, 4], [3, 4, 5, 6]) == 0.5
    assert ks_statistic([1, 2, 3], [1, 2, 3]) == 0.0
    assert ks_statistic([0.0, 1.0], [0.5]) == 0.5


def test_bin_fractions_use_open_outer_bins():
    edges = np.array([1.0, 2.0])
    assert bin_fractions(np.array([-5, 0.5, 1.0, 1.5, 2.0, 9.0]), edges).tolist() == [
        2 / 6,
        2 / 6,
        2 / 6,
    ]


def test_image_signals_by_hand():
    images = np.stack(
        [np.full((2, 2, 3), 51.0), np.array([0, 255] * 6, dtype=float).reshape(2, 2, 3)]
    )
    probabilities = np.array([[0.5, 0.5, 0.0], [0.1, 0.1, 0.8]])
    signals = image_signals(images, probabilities)
    assert signals["class"].tolist() == [0, 2]
    assert signals["confidence"].tolist() == [0.5, 0.8]
    assert signals["entropy"][0] == pytest.approx(math.log(2))
    assert signals["entropy"][1] == pytest.approx(-(0.2 * math.log(0.1) + 0.8 * math.log(0.8)))
    assert signals["brightness"].tolist() == pytest.approx([0.2, 0.5])
    assert signals["contrast"].tolist() == pytest.approx([0.0, 0.5])


def synthetic_signals(rng, count, classes=4, shift=0.0):
    probabilities = rng.dirichlet(np.ones(classes) * 0.3, size=count)
    images = rng.normal(100 + shift, 30, (count, 4, 4, 3)).clip(0, 255)
    return image_signals(images, probabilities)


@pytest.mark.slow
def test_reference_profile_and_comparison():
    rng = np.random.default_rng(0)
    profile = build_reference_profile(synthetic_signals(rng, 4000), list("abcd"), source="test")
    assert profile["samples"] == 4000 and len(profile["class_distribution"]) == 4
    for signal in profile["signals"].values():
        assert len(signal["bin_edges"]) == 9
        assert sum(signal["bin_fractions"]) == pytest.approx(1.0)
        assert signal["bin_fractions"] == pytest.approx([0.1] * 10, abs=0.01)
        assert len(signal["quantiles"]) == 2000
    same = compare(profile, synthetic_signals(rng, 1000))
    assert same["status"] == "stable" and same["max_psi"] < 0.1
    darker = compare(profile, synthetic_signals(rng, 1000, shift=-60))
    assert darker["signals"]["brightness"]["psi"] > 0.25
    assert darker["signals"]["brightness"]["ks"] > 0.5
    assert darker["status"] == "critical"


def test_monitor_window_is_a_ring_with_a_minimum():
    rng = np.random.default_rng(1)
    # The window's bookkeeping, not thresholds: no calibration (4 s of every export).
    profile = build_reference_profile(
        synthetic_signals(rng, 500), list("abcd"), source="test", calibrate=False
    )
    monitor = DriftMonitor(profile, window=100, min_samples=60)
    monitor.add(synthetic_signals(rng, 50))
    assert monitor.samples == 50 and monitor.compute() is None  # below the minimum: no report
    assert monitor.last_computed is None
    monitor.add(synthetic_signals(rng, 30))
    assert monitor.compute()["samples"] == 80
    for _ in range(5):
        monitor.add(synthetic_signals(rng, 37))
    assert monitor.samples == 100
    # The window holds exactly the newest 100 predictions.
    newest = synthetic_signals(rng, 100, shift=-80)
    monitor.add(newest)
    window = monitor.snapshot()
    assert sorted(window["brightness"]) == sorted(newest["brightness"])
    assert monitor.compute()["signals"]["brightness"]["psi"] > 0.25
    with pytest.raises(ValueError):
        DriftMonitor(profile, window=10, min_samples=20)


def test_no_drift_psi_matches_the_expected_noise_floor():
    """NOTES.md: undrifted PSI averages about (bins-1) * (1/window + 1/reference)."""
    rng = np.random.default_rng(2)
    profile = build_reference_profile(
        synthetic_signals(rng, 2000), list("abcd"), source="t", calibrate=False
    )
    values = [
        compare(profile, synthetic_signals(rng, 500))["signals"]["brightness"]["psi"]
        for _ in range(30)
    ]
    assert np.mean(values) == pytest.approx(9 * (1 / 500 + 1 / 2000), rel=0.4)


def confident_signals(rng, count, saturated=0.6, shift=0.0):
    """A confident model's signals: ``saturated`` of the predictions have confidence exactly
    1 (entropy 0), the rest are spread out."""
    signals = synthetic_signals(rng, count, shift=shift)
    ties = rng.random(count) < saturated
    signals["confidence"] = np.where(ties, 1.0, signals["confidence"])
    signals["entropy"] = np.where(ties, 0.0, signals["entropy"])
    return signals


def test_a_saturated_value_gets_its_own_bin_and_no_bin_is_narrower_than_the_grid():
    rng = np.random.default_rng(3)
    values = confident_signals(rng, 3000)["confidence"]
    edges = saturating_edges(values)
    fractions = bin_fractions(quantize(values), edges)
    assert fractions[-1] == pytest.approx(np.mean(values == 1.0))  # the tie at 1 alone
    assert edges[-1] == pytest.approx(1.0 - RESOLUTION / 2)
    assert np.all(np.diff(edges) >= RESOLUTION * 0.99)
    assert np.all(fractions > 0)  # no empty reference bin
    # Noise below the grid (a different batch size's rounding) moves nothing across an edge.
    noisy = np.clip(values * (1 - rng.uniform(0, 2e-5, len(values))), 0, 1)
    assert bin_fractions(quantize(noisy), edges).tolist() == pytest.approx(fractions.tolist())
    # A signal saturated at its low end (entropy 0) likewise.
    entropy = confident_signals(rng, 3000)["entropy"]
    low = saturating_edges(entropy)
    assert low[0] == pytest.approx(RESOLUTION / 2)
    assert bin_fractions(quantize(entropy), low)[0] == pytest.approx(np.mean(entropy == 0.0))


@pytest.mark.slow
def test_calibrated_thresholds_keep_false_alarms_rare_and_still_catch_drift():
    """Windows drawn from the population the reference came from (never from the reference
    itself) raise a warning on at most about 1 % of them, as calibrated; a shift of a third
    of a standard deviation in brightness is critical."""
    rng = np.random.default_rng(4)
    profile = build_reference_profile(confident_signals(rng, 1500), list("abcd"), source="t")
    statuses = [compare(profile, confident_signals(rng, 500))["status"] for _ in range(300)]
    false_alarms = sum(status != "stable" for status in statuses)
    assert false_alarms <= 9, statuses  # 3 %, with 1 % expected
    shifted = compare(profile, confident_signals(rng, 500, shift=10))
    levels = {name: values["level"] for name, values in shifted["signals"].items()}
    assert levels == {
        "class": "stable",
        "confidence": "stable",
        "entropy": "stable",
        "brightness": "critical",
        "contrast": "stable",
    }


@pytest.mark.slow
def test_thresholds_shrink_with_the_window_and_hold_at_the_ends():
    rng = np.random.default_rng(5)
    profile = build_reference_profile(confident_signals(rng, 2000), list("abcd"), source="t")
    calibrated = profile["thresholds"]
    # 14 output statistics and the embedding's domain classifier: a family of 15
    assert calibrated["quantiles"]["warning"] == pytest.approx(1 - 0.01 / 15)
    sizes = (100, 300, 1000, 3000, 10_000)
    for signal in ("class", "confidence", "brightness"):
        for statistic in ("psi", "js_distance", "ks") if signal != "class" else ("psi",):
            warning = [thresholds_at(profile, n)[1][signal][statistic]["warning"] for n in sizes]
            assert warning == sorted(warning, reverse=True), (signal, statistic, warning)
            critical = thresholds_at(profile, 1000)[1][signal][statistic]["critical"]
            assert critical >= thresholds_at(profile, 1000)[1][signal][statistic]["warning"]
    _, smallest = thresholds_at(profile, 1)
    _, at_50 = thresholds_at(profile, 50)
    assert smallest == at_50  # held below the smallest calibrated window
    # KS of a window of n against a reference of N: about 1.95 * sqrt(1/n + 1/N) at the
    # 99.9th percentile for a continuous signal (Kolmogorov), a little less with ties.
    ks = thresholds_at(profile, 1000)[1]["brightness"]["ks"]["warning"]
    assert (
        0.7 * 1.95 * math.sqrt(1 / 1000 + 1 / 2000)
        < ks
        < 1.3 * 1.95 * math.sqrt(1 / 1000 + 1 / 2000)
    )


def test_fixed_bands_as_a_setting_and_for_profiles_without_thresholds():
    rng = np.random.default_rng(6)
    profile = build_reference_profile(
        synthetic_signals(rng, 1000), list("abcd"), source="t", calibrate=False
    )
    # Calibrated thresholds for the setting to override: how many draws does not matter here.
    profile["thresholds"] = calibrate(profile, replicates=500)
    window = synthetic_signals(rng, 500, shift=-15)
    fixed = compare(profile, window, mode="fixed")
    assert fixed["thresholds"] == "fixed"
    assert fixed["signals"]["brightness"]["thresholds"]["psi"] == {
        "warning": 0.1,
        "critical": 0.25,
    }
    legacy = {key: value for key, value in profile.items() if key != "thresholds"}
    report = compare(legacy, window)
    assert report["thresholds"].startswith("fixed (the profile has no calibrated")
    assert report["signals"]["brightness"]["thresholds"]["ks"]["critical"] == 0.2
