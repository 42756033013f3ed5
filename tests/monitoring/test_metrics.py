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
    values = np.concatenate([rng.random(500), CONFIDENCE_BUCKETS, [0.0, 1.0, 5.0, np.inf]])
    for value in values:
        one_by_one.observe(float(value))
    observe_many(at_once, values[:300])
    observe_many(at_once, values[300:])
    observe_many(at_once, np.zeros(0))
    observe_many(at_once, [np.nan])  # observe() counts a NaN in no bucket
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


def test_drained_batches_give_the_signals_of_their_images_in_order(monkeypatch):
    """The pixel statistics of kept images (computed at the drain, in one pass) and of
    batches past the memory bound (computed when recorded) land in the drift window in the
    order the batches were answered, equal to ``image_signals`` of every image at once."""
    from monitoring import predictions
    from monitoring.drift import build_reference_profile, image_signals

    rng = np.random.default_rng(0)
    classes = ["a", "b", "c"]

    def batch(size: int) -> tuple[np.ndarray, np.ndarray]:
        images = rng.uniform(0, 255, (size, 8, 8, 3)).astype(np.float32)
        logits = rng.normal(size=(size, len(classes)))
        return images, np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)

    reference = build_reference_profile(image_signals(*batch(200)), classes, source="test")
    observer = predictions.PredictionObserver(
        classes=classes,
        name="m",
        version=1,
        provider="cpu",
        precision="fp32",
        profile=reference,
        window=1000,
        min_samples=10,
        interval=3600,
    )
    # Room for about two batches of kept images: the rest are computed when recorded.
    monkeypatch.setattr(predictions, "MAX_PENDING_IMAGE_BYTES", 2 * 5 * 8 * 8 * 3 * 4)
    batches = [batch(size) for size in (5, 3, 5, 1, 4, 2)]
    for images, probabilities in batches:
        observer.record(images, probabilities, 0.001)
    observer.drain()
    observer.record(*batches[0], 0.001)  # the bound is free again after the drain
    observer.drain()
    observer.stop()
    found = observer.monitor.snapshot()
    expected = image_signals(
        np.concatenate([images for images, _ in [*batches, batches[0]]]),
        np.concatenate([probabilities for _, probabilities in [*batches, batches[0]]]),
    )
    assert observer._kept_bytes == 0
    for name in ("brightness", "contrast", "confidence", "class"):
        np.testing.assert_allclose(found[name], expected[name], rtol=1e-12, err_msg=name)
