"""How a worker loads a version and builds what serves it, live or shadow: the one place
both batchers are made (``VersionBuilder.batcher``), so that the shadow's limits are the
live one's by construction, and where the live version's predictions get their observer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from monitoring.assessment import Answers
from monitoring.estimate import monitoring_references
from monitoring.observers import WorkerObserver
from monitoring.predictions import PredictionObserver
from monitoring.shadow import ShadowObserver
from serving.core.runtime import ClassifierRuntime
from serving.web.batcher import AdaptiveBatcher
from serving.web.served import ServedVersion
from serving.web.settings import ServingSettings
from serving.web.shadow import ShadowCopies


class VersionBuilder:
    """How this worker loads a version and serves it: live (its predictions observed against
    its own reference profile) or as the shadow of the live one (copies of live requests,
    compared on a thread of its own). ``batcher`` is the one factory of both batchers."""

    def __init__(
        self,
        settings: ServingSettings,
        *,
        ort_threads: int | None = None,
        metrics: WorkerObserver | None = None,
    ) -> None:
        self.settings = settings
        self.ort_threads = ort_threads
        self.metrics = metrics

    def load(self, path: Path) -> ClassifierRuntime:
        """The version in ``path``, loaded with this server's settings and verified."""
        return ClassifierRuntime.from_settings(
            path, self.settings, intra_op_threads=self.ort_threads
        )

    def batcher(
        self,
        runtime: ClassifierRuntime,
        predictions: PredictionObserver | None = None,
        metrics: WorkerObserver | None = None,
    ) -> AdaptiveBatcher:
        """A version's batcher, within this server's batching limits; the live one's also
        feeds its prediction observer and the worker's queue metrics."""
        settings = self.settings
        return AdaptiveBatcher(
            monitored_inference(runtime, predictions),
            max_batch_size=runtime.max_batch_size,
            max_wait_s=settings.batch_wait_ms / 1000,
            max_latency_s=settings.max_latency_ms / 1000,
            max_queue_size=settings.max_queue_size,
            on_batch=predictions.record if predictions else None,
            on_queue=metrics.queued if metrics else None,
            on_wait=metrics.waited if metrics else None,
        )

    def live(self, runtime: ClassifierRuntime) -> ServedVersion:
        """``runtime`` as the live version."""
        predictions = self.prediction_observer(runtime) if self.settings.monitoring else None
        batcher = self.batcher(runtime, predictions, self.metrics)
        return ServedVersion(runtime, batcher, predictions, lambda: self.batcher(runtime))

    def shadow(
        self, runtime: ClassifierRuntime, live: ServedVersion, fraction: float
    ) -> ShadowCopies:
        """``runtime`` as the shadow of ``live``, getting ``fraction`` of its requests. It
        answers ``/v2/models/{name}/versions/{v}/infer`` too, on its own batcher, without the
        live version's prediction metrics."""
        settings = self.settings
        observer = ShadowObserver(
            runtime.version,
            runtime.reference_profile() if settings.monitoring else None,
            window=settings.drift_window,
            min_samples=settings.drift_min_samples,
            mode=settings.drift_thresholds,
        )
        return ShadowCopies(
            ServedVersion(runtime, self.batcher(runtime)),
            live,
            fraction,
            observer,
            max_pending_images=settings.shadow_queue_images,
            drift_interval_s=settings.drift_interval_s,
            nice=settings.shadow_nice,
        )

    def prediction_observer(self, runtime: ClassifierRuntime) -> PredictionObserver:
        settings = self.settings
        profile = runtime.reference_profile()
        estimator, embedding = (
            monitoring_references(runtime.monitoring_files()) if profile else (None, None)
        )
        return PredictionObserver(
            estimator=estimator,
            embedding=embedding,
            classes=runtime.classes,
            name=runtime.name,
            version=runtime.version,
            provider=runtime.provider,
            precision=runtime.precision,
            profile=profile,
            window=settings.drift_window,
            min_samples=settings.drift_min_samples,
            interval=settings.drift_interval_s,
            thresholds=settings.drift_thresholds,
        )


def monitored_inference(runtime: ClassifierRuntime, predictions: PredictionObserver | None):
    """What a batcher runs: the model alone, or, with the label-free estimate, the model's
    probabilities and embeddings assessed right after the run (``Assessed``)."""
    if predictions is None or predictions.estimator is None:
        return runtime.predict

    def infer(images: np.ndarray) -> Answers:
        return predictions.assess(*runtime.predict_with_embeddings(images))

    return infer
