"""The live version's predictions, observed in each worker: batch sizes, inference time,
classes, confidence, entropy and input statistics as metrics; drift against the model's
reference profile, the label-free performance estimate and embedding drift, recomputed by a
background thread. Its own module because it is the one observer on the inference path that
keeps state: each batch is only appended here, and recorded with many others at once, off
the request path."""

from __future__ import annotations

import logging
import threading
from collections import deque

import numpy as np

from monitoring import metrics
from monitoring.assessment import Answers, Assessed, AssessedBatch
from monitoring.buffer import BUFFER
from monitoring.drift import DriftMonitor, ReferenceBins, output_signals, pixel_signals

log = logging.getLogger(__name__)

#: A backstop: drain on the event loop if this many batches wait (the flush thread stalled).
MAX_PENDING_BATCHES = 1024
#: Batches' images kept for their pixel statistics until the next drain, at most this many
#: bytes (a second of small inputs); past it a batch's statistics are computed at once.
MAX_PENDING_IMAGE_BYTES = 16 * 2**20


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
        self.reference_performance = self._publish_reference_performance(profile)
        if profile is not None:
            self._start_drift_monitor(
                profile,
                version,
                window=window,
                min_samples=min_samples,
                mode=thresholds,
                interval=interval,
            )
        else:
            log.warning("no reference_profile.json in the model directory: drift is not monitored")

    def _publish_reference_performance(self, profile: dict | None) -> dict | None:
        """The model's held-out performance from its reference profile (None when the
        profile has none), published as the reference gauges the accuracy alerts compare
        with."""
        performance = (profile or {}).get("performance")
        if performance:
            metrics.REFERENCE_ACCURACY.set(performance["accuracy"])
            metrics.REFERENCE_MEAN_CONFIDENCE.set(performance["mean_confidence"])
            metrics.REFERENCE_CALIBRATION_ERROR.set(performance["expected_calibration_error"])
        return performance

    def _start_drift_monitor(
        self,
        profile: dict,
        version: int,
        *,
        window: int,
        min_samples: int,
        mode: str,
        interval: float,
    ) -> None:
        """This worker's drift window against ``profile``, its bounds as gauges, a counter
        for every reference bin, and the thread that recomputes drift every ``interval``
        seconds."""
        self.monitor = DriftMonitor(
            profile,
            estimator=self.estimator,
            embedding=self.embedding,
            window=window,
            min_samples=min_samples,
            mode=mode,
        )
        metrics.DRIFT_WINDOW_CAPACITY.set(window)
        metrics.DRIFT_MIN_SAMPLES.set(min_samples)
        metrics.DRIFT_REFERENCE.set(profile["samples"])
        metrics.DRIFT_LAST_COMPUTED.set(0)
        self._count_reference_bins(profile, version)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, args=(interval,), name="drift", daemon=True
        )
        self._thread.start()

    def _count_reference_bins(self, profile: dict, version: int) -> None:
        """Every bin's counter, and the reference's fraction in each, from the start: a bin
        the fleet never fills must read 0 to the recording rules, not be missing."""
        self.reference_bins = ReferenceBins(profile)
        self._bins = {
            signal: [metrics.DRIFT_BIN.labels(signal, label, str(version)) for label in labels]
            for signal, labels in self.reference_bins.labels.items()
        }
        for signal, labels in self.reference_bins.labels.items():
            fractions = self.reference_bins.fractions[signal]
            for label, fraction in zip(labels, fractions, strict=True):
                metrics.DRIFT_REFERENCE_BIN.labels(signal, label, str(version)).set(fraction)

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

    def record(self, images: np.ndarray, answered: Answers, seconds: float) -> None:
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
