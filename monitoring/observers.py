"""What the service records about its requests, its workers, the labels it is sent and the
versions it serves: small observers that turn each event into metrics and keep nothing but
cached metric children. Counters and histograms add up across workers. What happens on every
request or batch goes through ``monitoring.buffer.BUFFER``, except the request count; the
rest is written at once. The observers that keep state have modules of their own: the live
version's predictions and drift window (``monitoring.predictions``), a shadow version's
evidence (``monitoring.shadow``)."""

from __future__ import annotations

from monitoring import metrics
from monitoring.buffer import BUFFER
from monitoring.feedback_errors import STORE_OPERATIONS
from monitoring.store_file import REASONS as STORE_REASONS


class RequestObserver:
    """HTTP-side metrics: requests by endpoint and code, error reasons, latency, decode time.
    Labelled children are cached: ``labels()`` takes a lock on every call. Requests are
    counted at once; the latency and decode histograms go through the buffer (a killed
    worker loses at most its last second of them)."""

    def __init__(self) -> None:
        self._requests: dict[tuple[str, int], object] = {}
        self._durations: dict[str, object] = {}

    def request(self, endpoint: str, code: int, seconds: float) -> None:
        counter = self._requests.get((endpoint, code))
        if counter is None:
            counter = self._requests[(endpoint, code)] = metrics.REQUESTS.labels(
                endpoint, str(code)
            )
        duration = self._durations.get(endpoint)
        if duration is None:
            duration = self._durations[endpoint] = metrics.REQUEST_DURATION.labels(endpoint)
        # Written at once, not buffered: a worker killed before its next flush would take
        # a second of answers with it, and this count is what the error alerts divide by.
        counter.inc()
        BUFFER.observe(duration, seconds)

    def error(self, endpoint: str, reason: str) -> None:
        metrics.REQUEST_ERRORS.labels(endpoint, reason).inc()

    def decoded(self, seconds: float) -> None:
        BUFFER.observe(metrics.DECODE_DURATION, seconds)


class WorkerObserver:
    """A worker's readiness, start-up facts and batch queue."""

    def ready(self, ready: bool) -> None:
        metrics.READY.set(1 if ready else 0)
        metrics.WORKERS_READY.set(1 if ready else 0)

    def configured(self, workers: int) -> None:
        metrics.WORKERS.set(workers)

    def replaced(self, dead_workers: int) -> None:
        metrics.WORKER_DEATHS.inc(dead_workers)

    def failed_to_start(self, workers: int) -> None:
        metrics.WORKER_START_FAILURES.inc(workers)

    def watch_in_flight(self, in_flight) -> None:
        """Keep ``imgclf_requests_in_progress`` at ``in_flight()``, read at every flush of
        the buffer: nothing on the request path."""
        BUFFER.add_source(lambda: BUFFER.set(metrics.REQUESTS_IN_PROGRESS, in_flight()))

    def queued(self, requests: int) -> None:
        BUFFER.set(metrics.BATCH_QUEUE, requests)

    def waited(self, seconds: float) -> None:
        BUFFER.observe(metrics.BATCH_QUEUE_WAIT, seconds)

    def loaded(self, provider: str, options: dict[str, str], seconds: float) -> None:
        metrics.MODEL_LOAD_SECONDS.set(seconds)
        metrics.EXECUTION_PROVIDER.labels(
            provider,
            options.get("device_id", ""),
            options.get("cudnn_conv_algo_search", ""),
            options.get("use_tf32", ""),
        ).set(1)

    def warmed(self, batch_sizes: list[int], seconds: float) -> None:
        metrics.WARM_UP_SECONDS.set(seconds)
        for size in batch_sizes:
            metrics.WARMED_BATCH_SIZE.labels(str(size)).set(1)


class FeedbackObserver:
    """Delayed-label metrics: matched labels by class and outcome, the rolling accuracy and
    per-class recall (once ``min_samples`` are labelled), and the store's size. The figures
    come from the store every worker shares, so whichever worker published last is right."""

    def __init__(self, *, capacity: int, min_samples: int, margin: float) -> None:
        self.min_samples = min_samples
        metrics.FEEDBACK_STORE_CAPACITY.set(capacity)
        metrics.FEEDBACK_STORE.set(0)
        metrics.ACCURACY_ALERT_MARGIN.set(margin)
        # Every failure counted from 0, so that increase() sees the first one.
        for operation in STORE_OPERATIONS:
            for reason in STORE_REASONS:
                metrics.FEEDBACK_STORE_ERRORS.labels(operation, reason)

    def stored(self, predictions: int) -> None:
        metrics.FEEDBACK_STORE.set(predictions)

    def taken(self, predictions: int) -> None:
        metrics.FEEDBACK_IDS_TAKEN.inc(predictions)

    def failed(self, operation: str, reason: str, lost: int) -> None:
        metrics.FEEDBACK_STORE_ERRORS.labels(operation, reason).inc()
        if lost:
            metrics.FEEDBACK_PREDICTIONS_LOST.inc(lost)

    def labelled(self, outcomes: list[tuple[str, bool, int]], summary: dict) -> None:
        """``outcomes``: (true class, correct, version that predicted) per label;
        ``summary``: the live version's figures."""
        for label, correct, version in outcomes:
            metrics.FEEDBACK.labels(
                label, "correct" if correct else "incorrect", str(version)
            ).inc()
        metrics.FEEDBACK_WINDOW.set(summary["count"])
        if summary["count"] < self.min_samples:
            return
        metrics.FEEDBACK_ACCURACY.set(summary["accuracy"])
        audit = summary.get("estimate") or {}
        if audit.get("count", 0) >= self.min_samples:
            metrics.FEEDBACK_ESTIMATED_ACCURACY.set(audit["estimated_accuracy"])
            metrics.FEEDBACK_ESTIMATE_GAP.set(audit["gap"])
        for label, figures in summary["per_class"].items():
            if figures["support"]:
                metrics.FEEDBACK_RECALL.labels(label).set(figures["recall"])


class VersionObserver:
    """Which version serves in each role, the switches and the refusals."""

    def serving(self, live: int, shadow: int | None) -> None:
        metrics.SERVED_VERSION.labels("live").set(live)
        metrics.SERVED_VERSION.labels("shadow").set(shadow or 0)

    def switched(self, role: str) -> None:
        metrics.VERSION_SWITCHES.labels(role).inc()

    def refused(self, version: int) -> None:
        metrics.VERSION_REFUSALS.labels(str(version)).inc()
        metrics.VERSION_REFUSED.labels(str(version)).set(1)

    def forgiven(self, version: int) -> None:
        """A refused version was published again: it is tried afresh."""
        metrics.VERSION_REFUSED.labels(str(version)).set(0)
