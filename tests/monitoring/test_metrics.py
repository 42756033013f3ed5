"""observe_many against prometheus_client's own observe, and the per-worker buffer."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from monitoring.buffer import MetricBuffer
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


def test_the_buffer_writes_sums_on_flush_and_nothing_before():
    registry = CollectorRegistry()
    counter = Counter("requests", "r", ["code"], registry=registry)
    histogram = Histogram("seconds", "s", buckets=(0.1, 1.0), registry=registry)
    gauge = Gauge("queue", "q", registry=registry)
    buffer = MetricBuffer(interval=3600)
    ok = counter.labels("200")
    for _ in range(5):
        buffer.inc(ok)
    buffer.inc(counter.labels("500"), 2)
    buffer.observe(histogram, 0.05)
    buffer.observe_all(histogram, [0.5, 5.0])
    buffer.set(gauge, 3)
    buffer.set(gauge, 7)  # the last value set wins
    assert registry.get_sample_value("requests_total", {"code": "200"}) == 0
    buffer.flush()
    assert registry.get_sample_value("requests_total", {"code": "200"}) == 5
    assert registry.get_sample_value("requests_total", {"code": "500"}) == 2
    assert registry.get_sample_value("seconds_bucket", {"le": "0.1"}) == 1
    assert registry.get_sample_value("seconds_bucket", {"le": "1.0"}) == 2
    assert registry.get_sample_value("seconds_count") == 3
    assert registry.get_sample_value("queue") == 7
    buffer.flush()  # nothing new: nothing counted twice
    assert registry.get_sample_value("requests_total", {"code": "200"}) == 5
