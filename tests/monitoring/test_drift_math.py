"""The drift maths against values computed by hand, and the monitor's window."""

from __future__ import annotations

import math

import numpy as np
import pytest

from monitoring.drift import (
    DriftMonitor,
    bin_fractions,
    build_reference_profile,
    compare,
    image_signals,
    js_distance,
    ks_statistic,
    psi,
)


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
    profile = build_reference_profile(synthetic_signals(rng, 500), list("abcd"), source="test")
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
    profile = build_reference_profile(synthetic_signals(rng, 2000), list("abcd"), source="t")
    values = [
        compare(profile, synthetic_signals(rng, 500))["signals"]["brightness"]["psi"]
        for _ in range(30)
    ]
    assert np.mean(values) == pytest.approx(9 * (1 / 500 + 1 / 2000), rel=0.4)
