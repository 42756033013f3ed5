"""observe_many against prometheus_client's own observe, value by value."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from monitoring.metrics import CONFIDENCE_BUCKETS, observe_many


def buckets_and_sum(histogram: Histogram) -> tuple[dict, float]:
    found = {s.labels["le"]: s.value for s in histogram.collect()[0].samples if "le" in s.labels}
    total = next(s.value for s in histogram.collect()[0].samples if s.name.endswith("_sum"))
    return found, total


def test_observe_many_equals_observing_one_by_one():
    registry = CollectorRegistry()
    one_by_one = Histogram("a", "a", buckets=CONFIDENCE_BUCKETS, registry=registry)
    at_once = Histogram("b", "b", buckets=CONFIDENCE_BUCKETS, registry=registry)
    rng = np.random.default_rng(0)
    # Values on the bucket bounds, between them, below the first and above the last.
    values = np.concatenate([rng.random(500), CONFIDENCE_BUCKETS, [0.0, 1.0, 5.0]])
    for value in values:
        one_by_one.observe(float(value))
    observe_many(at_once, values[:300])
    observe_many(at_once, values[300:])
    observe_many(at_once, np.zeros(0))
    expected_buckets, expected_sum = buckets_and_sum(one_by_one)
    found_buckets, found_sum = buckets_and_sum(at_once)
    assert found_buckets == expected_buckets
    assert expected_buckets["+Inf"] == len(values)
    assert found_sum == pytest.approx(expected_sum)
