"""What the service records. Each worker process records its own requests, batches,
predictions and start-up facts; counters and histograms add up across workers, and each
worker keeps its own drift window over the share of traffic it serves. What happens on every
request or batch goes through ``monitoring.buffer.BUFFER``, except the request count; the
rest is written at once."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

import numpy as np

from monitoring import metrics
from monitoring.buffer import BUFFER
from monitoring.drift import (
    DriftMonitor,
    ReferenceBins,
    image_signals,
    output_signals,
    pixel_signals,
)
from monitoring.feedback_errors import STORE_OPERATIONS
from monitoring.store_file import REASONS as STORE_REASONS

log = logging.getLogger(__name__)

#: A backstop: drain on the event loop if this many batches wait (the flush thread stalled).
MAX_PENDING_BATCHES = 1024
#: Batches' images kept for their pixel statistics until the next drain, at most this many
#: bytes (a second of small inputs); past it a batch's statistics are computed at once.
MAX_PENDING_IMAGE_BYTES = 16 * 2**20


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


class Assessed:
    """A batch's answers (or one request's rows of them), and what the label-free estimate
    makes of them, computed later: the probabilities are what ``np.asarray`` gives, so an
    answer reads as before; each answer's expected correctness, its calibrated probabilities,
    whether it lies outside the reference's support and its reduced embedding are computed
    for many batches at once by ``PredictionObserver.drain``, off the request path, the first
    time anything asks for them."""

    def __init__(self, observer, probabilities, embeddings, batch=None, offset: int = 0):
        self.probabilities = probabilities
        self._observer = observer
        #: The whole batch's figures, shared by its requests' slices.
        self.batch = batch if batch is not None else AssessedBatch(probabilities, embeddings)
        self._offset = offset

    def __len__(self) -> int:
        return len(self.probabilities)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.probabilities, dtype=dtype)

    def __getitem__(self, rows: slice) -> Assessed:
        start, _, _ = rows.indices(len(self.probabilities))
        return Assessed(
            self._observer, self.probabilities[rows], None, self.batch, self._offset + start
        )

    def expected(self) -> list[float]:
        """Each answer's expected correctness (the feedback store asks, when it writes, four
        times a second): every pending batch is assessed in one pass, and left for the next
        drain to record."""
        if self.batch.expected is None:
            self._observer.assess_pending()
            self._observer.assess_now(self.batch)  # its record may not have come yet
        return self.batch.expected[self._offset : self._offset + len(self)].tolist()


class AssessedBatch:
    """One inference batch, before and after its assessment."""

    def __init__(self, probabilities: np.ndarray, embeddings: np.ndarray | None) -> None:
        self.probabilities = probabilities
        self.embeddings = embeddings
        self.expected: np.ndarray | None = None
        self.calibrated: np.ndarray | None = None
        self.outside: np.ndarray | None = None
        self.reduced: np.ndarray | None = None


class PredictionObserver:
    """Model-side metrics and drift: batch size, inference time, classes, confidence, entropy,
    input statistics; a background thread recomputes drift, the label-free estimate and
    embedding drift every ``interval`` seconds."""

    def __init__(
        self,
        *,
        classes: list[str],
        name: str,
        version: int,
        provider: str,
        precision: str,
        profile: dict | None,
        window: int,
        min_samples: int,
        interval: float = 15.0,
        thresholds: str = "calibrated",
        estimator=None,
        embedding=None,
    ) -> None:
        self.classes = classes
        #: ``monitoring.estimate.LabelFreeEstimator`` and ``monitoring.embedding.
        #: EmbeddingReference`` of the model directory (None when it has not got them).
        self.estimator = estimator
        # The embeddings come to the window through ``assess``: without an estimator, none.
        self.embedding = embedding if estimator is not None else None
        self._class_counters = [metrics.PREDICTIONS.labels(label) for label in classes]
        self._answered = metrics.VERSION_PREDICTIONS.labels(str(version))
        #: Batches recorded but not yet drained: (images or their pixel signals, answers,
        #: seconds), and the bytes of the images kept.
        self._pending: deque = deque()
        self._kept_bytes = 0
        self._kept_lock = threading.Lock()
        self._drain_lock = threading.Lock()
        self._assess_lock = threading.Lock()
        BUFFER.add_source(self.drain)
        self._info = metrics.MODEL_INFO.labels(name, str(version), provider, precision)
        self._info.set(1)
        self.monitor = None
        self.reference_performance = (profile or {}).get("performance")
        if self.reference_performance:
            metrics.REFERENCE_ACCURACY.set(self.reference_performance["accuracy"])
            metrics.REFERENCE_MEAN_CONFIDENCE.set(self.reference_performance["mean_confidence"])
            metrics.REFERENCE_CALIBRATION_ERROR.set(
                self.reference_performance["expected_calibration_error"]
            )
        if profile is not None:
            self.monitor = DriftMonitor(
                profile,
                window=window,
                min_samples=min_samples,
                mode=thresholds,
                estimator=estimator,
                embedding=self.embedding,
            )
            metrics.DRIFT_WINDOW_CAPACITY.set(window)
            metrics.DRIFT_MIN_SAMPLES.set(min_samples)
            metrics.DRIFT_REFERENCE.set(profile["samples"])
            metrics.DRIFT_LAST_COMPUTED.set(0)
            # Every bin's counter exists from the start: a bin the fleet never fills must
            # read 0 to the recording rules, not be missing.
            self.reference_bins = ReferenceBins(profile)
            self._bins = {
                signal: [metrics.DRIFT_BIN.labels(signal, label, str(version)) for label in labels]
                for signal, labels in self.reference_bins.labels.items()
            }
            for signal, labels in self.reference_bins.labels.items():
                fractions = self.reference_bins.fractions[signal]
                for label, fraction in zip(labels, fractions, strict=True):
                    metrics.DRIFT_REFERENCE_BIN.labels(signal, label, str(version)).set(fraction)
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._loop, args=(interval,), name="drift", daemon=True
            )
            self._thread.start()
        else:
            log.warning("no reference_profile.json in the model directory: drift is not monitored")

    def assess(self, probabilities: np.ndarray, embeddings: np.ndarray | None) -> Assessed:
        """On the inference thread, right after the run: only a wrapper; the assessment is
        made later, for many batches at once (``assess_now``)."""
        return Assessed(self, probabilities, embeddings)

    def assess_now(self, *batches: AssessedBatch) -> None:
        """Calibrate the answers of every batch not assessed yet, reduce their embeddings and
        check their support, in one vectorised pass."""
        with self._assess_lock:
            todo = [batch for batch in batches if batch.expected is None]
            if not todo:
                return
            probabilities = np.concatenate([batch.probabilities for batch in todo])
            reduced = None
            if self.embedding is not None and todo[0].embeddings is not None:
                reduced = self.embedding.reduce(
                    np.concatenate([batch.embeddings for batch in todo])
                )
            calibrated, outside = self.estimator.calibrate(probabilities, reduced)
            expected = self.estimator.expected_correct(calibrated, probabilities)
            start = 0
            for batch in todo:
                end = start + len(batch.probabilities)
                batch.calibrated, batch.outside = calibrated[start:end], outside[start:end]
                batch.reduced = None if reduced is None else reduced[start:end]
                batch.embeddings = None  # kept until now only for this
                batch.expected = expected[start:end]
                start = end

    def assess_pending(self) -> None:
        """Assess the batches waiting for the drain, leaving the rest of their recording to
        it: the feedback store writes four times as often as the metrics are flushed, and
        each drain has a fixed cost."""
        pending = list(self._pending)  # one C call: no append can interleave
        self.assess_now(
            *(answered.batch for _, answered, _ in pending if isinstance(answered, Assessed))
        )

    def record(self, images: np.ndarray, answered, seconds: float) -> None:
        """After each batch, on the event loop: an append. Everything waits for ``drain``,
        which handles every batch since the last one in one vectorised pass (with small
        batches, per-batch numpy calls were monitoring's largest cost), the pixel statistics
        included: the batch's images are kept until then, not copied, unless the images
        kept would pass ``MAX_PENDING_IMAGE_BYTES``; then this batch's statistics are
        computed now and its images let go."""
        with self._kept_lock:
            keep = self._kept_bytes + images.nbytes <= MAX_PENDING_IMAGE_BYTES
            if keep:
                self._kept_bytes += images.nbytes
        self._pending.append((images if keep else pixel_signals(images), answered, seconds))
        if len(self._pending) >= MAX_PENDING_BATCHES:
            self.drain()

    def _pixel_signals(self, batches: list) -> dict[str, np.ndarray]:
        """The pending batches' pixel statistics, in order: the kept images' computed in one
        pass, next to those computed when their batch was recorded."""
        kept = [pixels for pixels, _, _ in batches if isinstance(pixels, np.ndarray)]
        computed = pixel_signals(np.concatenate(kept)) if kept else {}
        with self._kept_lock:
            self._kept_bytes -= sum(images.nbytes for images in kept)
        parts: dict[str, list[np.ndarray]] = {"brightness": [], "contrast": []}
        start = 0
        for pixels, _, _ in batches:
            if isinstance(pixels, np.ndarray):
                end = start + len(pixels)
                pixels = {name: values[start:end] for name, values in computed.items()}
                start = end
            for name, found in parts.items():
                found.append(pixels[name])
        return {name: np.concatenate(found) for name, found in parts.items()}

    def drain(self) -> None:
        """Record the pending batches: called before every metrics flush (each second, and
        before a scrape this worker answers) and before every drift computation."""
        with self._drain_lock:
            batches = []
            while self._pending:
                batches.append(self._pending.popleft())
            if not batches:
                return
            answers = [answered for _, answered, _ in batches]
            probabilities = np.concatenate([np.asarray(answered) for answered in answers])
            signals = output_signals(probabilities) | self._pixel_signals(batches)
            BUFFER.observe_all(metrics.INFERENCE_DURATION, [seconds for *_, seconds in batches])
            BUFFER.observe_all(metrics.BATCH_SIZE, [len(answered) for answered in answers])
            BUFFER.inc(self._answered, len(probabilities))
            for histogram, name in (
                (metrics.CONFIDENCE, "confidence"),
                (metrics.ENTROPY, "entropy"),
                (metrics.BRIGHTNESS, "brightness"),
                (metrics.CONTRAST, "contrast"),
            ):
                BUFFER.observe_all(histogram, signals[name].tolist())
            classes = np.bincount(signals["class"], minlength=len(self.classes))
            for index in np.flatnonzero(classes).tolist():
                BUFFER.inc(self._class_counters[index], int(classes[index]))
            if self.monitor is None:
                return
            if all(isinstance(answered, Assessed) for answered in answers):
                batches = [answered.batch for answered in answers]
                self.assess_now(*batches)
                signals["calibrated"] = np.concatenate([batch.calibrated for batch in batches])
                signals["outside"] = np.concatenate([batch.outside for batch in batches])
                if batches[0].reduced is not None:
                    signals["embedding"] = np.concatenate([batch.reduced for batch in batches])
            # One increment per bin reached, not per prediction.
            for signal, counts in self.reference_bins.counts(signals).items():
                children = self._bins[signal]
                for index in np.flatnonzero(counts).tolist():
                    BUFFER.inc(children[index], int(counts[index]))
            self.monitor.add(signals)

    def compute_drift(self) -> dict | None:
        """Recompute drift now and publish it; None while the window is below the minimum."""
        self.drain()
        metrics.DRIFT_WINDOW.set(self.monitor.samples)
        report = self.monitor.compute()
        if report is None:
            return None
        for signal, values in report["signals"].items():
            metrics.DRIFT_PSI.labels(signal).set(values["psi"])
            metrics.DRIFT_JS.labels(signal).set(values["js_distance"])
            if "ks" in values:
                metrics.DRIFT_KS.labels(signal).set(values["ks"])
            for statistic, levels in values["thresholds"].items():
                for level, threshold in levels.items():
                    metrics.DRIFT_THRESHOLD.labels(signal, statistic, level).set(threshold)
        metrics.WINDOW_MEAN_CONFIDENCE.set(report["mean_confidence"])
        estimate = report.get("estimate")
        if estimate is not None:
            metrics.ESTIMATED_ACCURACY.set(estimate["accuracy"])
            metrics.OUT_OF_SUPPORT.set(estimate["out_of_support"])
            for label, figures in estimate["per_class"].items():
                metrics.ESTIMATED_PRECISION.labels(label).set(figures["precision"])
                metrics.ESTIMATED_RECALL.labels(label).set(figures["recall"])
        embedding = report.get("embedding")
        if embedding is not None:
            metrics.DRIFT_DOMAIN_AUC.labels("embedding").set(embedding["domain_classifier_auc"])
            for level, threshold in embedding["thresholds"].items():
                metrics.DRIFT_THRESHOLD.labels("embedding", "domain_classifier_auc", level).set(
                    threshold
                )
        metrics.DRIFT_LAST_COMPUTED.set(self.monitor.last_computed)
        return report

    def describe(self) -> dict:
        """This worker's drift window and the label-free performance estimate, for /metadata."""
        if self.monitor is None:
            return {"drift": None, "performance": {"reference": self.reference_performance}}
        report = self.monitor.last_report
        return {
            "drift": {
                "thresholds": report["thresholds"] if report else self.monitor.mode,
                "window": self.monitor.window,
                "min_samples": self.monitor.min_samples,
                "samples": self.monitor.samples,
                "status": report["status"] if report else "not computed yet",
                "computed_at": self.monitor.last_computed,
                "signals": {
                    name: {"level": values["level"]} for name, values in report["signals"].items()
                }
                if report
                else {},
            },
            "performance": {
                "reference": self.reference_performance,
                "window_mean_confidence": report["mean_confidence"] if report else None,
                "window_samples": report["samples"] if report else 0,
                "estimate": report.get("estimate") if report else None,
                "calibration": self.estimator.calibration if self.estimator else None,
            },
            "embedding": report.get("embedding") if report else None,
        }

    def stop(self) -> None:
        if self.monitor is not None:
            self._stop.set()

    def retire(self) -> None:
        """Another version took over: stop the drift thread, and say this one is not served."""
        self.drain()
        BUFFER.remove_source(self.drain)
        self.stop()
        self._info.set(0)

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.compute_drift()
            except Exception:  # never let the drift thread die silently
                log.exception("drift computation failed")


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


class ShadowObserver:
    """The evidence for one shadow version against the live one: counters over its whole
    life (fleet-wide by summing), and this worker's window of the last ``window`` compared
    images (agreement, mean confidence of each, drift of the shadow's answers against its
    own reference profile). Called from the shadow's thread: the window keeps running sums
    (O(1) per image), and the gauges are written at most once a second."""

    def __init__(
        self, version: int, profile: dict | None, *, window: int, min_samples: int, mode: str
    ) -> None:
        label = str(version)
        self._outcomes = {
            outcome: metrics.SHADOW_IMAGES.labels(label, outcome)
            for outcome in ("compared", "dropped", "failed", "skipped")
        }
        self._agreements = metrics.SHADOW_AGREEMENTS.labels(label)
        self.window = window
        #: (agreed, live confidence, shadow confidence) per compared image, and their sums.
        self._recent: deque[tuple[bool, float, float]] = deque()
        self._agreed, self._confidence_live, self._confidence_shadow = 0, 0.0, 0.0
        self.totals = dict.fromkeys(self._outcomes, 0) | {"agreed": 0}
        self.monitor = (
            DriftMonitor(profile, window=window, min_samples=min_samples, mode=mode)
            if profile is not None
            else None
        )
        self.drift: dict | None = None
        self._published = 0.0

    def counted(self, outcome: str, images: int) -> None:
        BUFFER.inc(self._outcomes[outcome], images)
        self.totals[outcome] += images

    def compared(
        self, images: np.ndarray, live: np.ndarray, shadow: np.ndarray, seconds: float
    ) -> None:
        agree = live.argmax(axis=1) == shadow.argmax(axis=1)
        agreed = int(agree.sum())
        self.counted("compared", len(agree))
        self.totals["agreed"] += agreed
        BUFFER.inc(self._agreements, agreed)
        BUFFER.observe(metrics.SHADOW_DURATION, seconds)
        rows = zip(
            agree.tolist(), live.max(axis=1).tolist(), shadow.max(axis=1).tolist(), strict=True
        )
        for row in rows:
            self._recent.append(row)
            self._agreed += row[0]
            self._confidence_live += row[1]
            self._confidence_shadow += row[2]
        while len(self._recent) > self.window:
            gone = self._recent.popleft()
            self._agreed -= gone[0]
            self._confidence_live -= gone[1]
            self._confidence_shadow -= gone[2]
        if self.monitor is not None:
            self.monitor.add(image_signals(images, shadow))
        if time.monotonic() - self._published >= 1.0:
            self.publish()

    def publish(self) -> None:
        """The window's figures as gauges."""
        self._published = time.monotonic()
        summary = self.summary()
        if summary["window_samples"]:
            metrics.SHADOW_WINDOW.set(summary["window_samples"])
            metrics.SHADOW_AGREEMENT.set(summary["agreement"])
            for role in ("live", "shadow"):
                metrics.SHADOW_MEAN_CONFIDENCE.labels(role).set(summary["mean_confidence"][role])

    def compute_drift(self) -> None:
        if self.monitor is None:
            return
        report = self.monitor.compute()
        if report is None:
            return
        self.drift = {
            "status": report["status"],
            "signals": {
                name: {"psi": values["psi"], "level": values["level"]}
                for name, values in report["signals"].items()
            },
        }
        for signal, values in report["signals"].items():
            metrics.SHADOW_DRIFT_PSI.labels(signal).set(values["psi"])

    def summary(self) -> dict:
        samples = len(self._recent)
        agreed, live, shadow = self._agreed, self._confidence_live, self._confidence_shadow
        return {
            "window_samples": samples,
            "agreement": agreed / samples if samples else None,
            "mean_confidence": {
                "live": live / samples if samples else None,
                "shadow": shadow / samples if samples else None,
            },
            "totals": dict(self.totals),
            "drift": self.drift,
        }
