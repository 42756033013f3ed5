"""The BentoML service: one class, one process per worker, each holding its own ONNX Runtime
session and batching its own concurrent requests.

    bentoml serve serving.service:ImageClassifier        # or: imgclf serve --model DIR

Routes (``serving/http.py``): ``POST /predict``, ``POST /predict_batch``, ``GET /metadata``,
``POST|GET /feedback`` (``serving/feedback.py``) and the Open Inference Protocol's ``/v2``;
BentoML adds ``/livez``, ``/metrics`` and ``/docs.json``; ``/readyz`` answers from the
worker's lifecycle (``serving/lifecycle.py``). The model comes from BentoML's model store
(``IMGCLF_BENTO_MODEL``, what ``bentoml build`` packages) or from a published directory
(``IMGCLF_MODEL_DIR``). No TensorFlow anywhere on this path.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bentoml

from monitoring.buffer import BUFFER, FlushBeforeScrape
from monitoring.feedback import FeedbackStore
from monitoring.observers import (
    FeedbackObserver,
    PredictionObserver,
    RequestObserver,
    WorkerObserver,
)
from serving.batcher import AdaptiveBatcher
from serving.feedback import Feedback
from serving.http import Frontend, Limits, PlainErrorsAsJSON, build_app
from serving.lifecycle import (
    FAILED,
    READY,
    WARMING,
    Lifecycle,
    LifecycleMiddleware,
    drain_before_exit,
)
from serving.openapi import MergeOpenAPIPaths
from serving.runtime import ClassifierRuntime
from serving.sessions import expected_provider
from serving.settings import ServingSettings, default_decode_threads, default_workers

log = logging.getLogger(__name__)

SETTINGS = ServingSettings.from_env()
PROVIDER = expected_provider(SETTINGS.provider)
WORKERS = SETTINGS.workers or default_workers(PROVIDER)
DECODE_THREADS = SETTINGS.decode_threads or default_decode_threads(PROVIDER, WORKERS)
#: ONNX Runtime threads per worker: the cores shared out, unless set.
ORT_THREADS = SETTINGS.intra_op_threads or max(1, (os.cpu_count() or 1) // WORKERS)
STORED_MODEL = None if SETTINGS.model_dir else bentoml.models.BentoModel(SETTINGS.bento_model)
WORKER = WorkerObserver() if SETTINGS.monitoring else None
if SETTINGS.monitoring:
    BUFFER.start()
LIFECYCLE = Lifecycle(on_ready=WORKER.ready if WORKER else None)
app = build_app()


@bentoml.service(
    name="imgclf",
    workers=WORKERS,
    traffic={"timeout": SETTINGS.timeout_s}
    | ({"max_concurrency": SETTINGS.max_concurrency} if SETTINGS.max_concurrency else {}),
    # OpenTelemetry spans cost about 0.2 ms per request even when none is sampled.
    tracing={} if SETTINGS.tracing else {"excluded_urls": ".*"},
    logging={"access": {"enabled": SETTINGS.access_log}},
)
@bentoml.asgi_app(app, path="/")
class ImageClassifier:
    stored_model = STORED_MODEL

    def __init__(self) -> None:
        # BentoML's server logging keeps the root at WARNING: let our lifecycle lines through.
        logging.getLogger("serving").setLevel(logging.INFO)
        # Loading (hashes, session, graph checks) fails start-up at once; warm-up runs in the
        # background so /livez answers while /readyz says "warming".
        model_dir = SETTINGS.model_dir or Path(self.stored_model.path)
        runtime = ClassifierRuntime.from_settings(model_dir, SETTINGS, intra_op_threads=ORT_THREADS)
        profile = runtime.reference_profile() if SETTINGS.monitoring else None
        predictions = prediction_observer(runtime, profile) if SETTINGS.monitoring else None
        self.predictions = predictions
        self.feedback = (
            feedback(runtime, profile)
            if SETTINGS.monitoring and SETTINGS.feedback_store_size
            else None
        )
        log.info(
            "serving %s; %d workers, %d decode threads each",
            runtime.summary(),
            WORKERS,
            DECODE_THREADS,
        )
        self.batcher = AdaptiveBatcher(
            runtime.predict,
            max_batch_size=runtime.max_batch_size,
            max_wait_s=SETTINGS.batch_wait_ms / 1000,
            max_latency_s=SETTINGS.max_latency_ms / 1000,
            max_queue_size=SETTINGS.max_queue_size,
            on_batch=predictions.record if predictions else None,
            on_queue=WORKER.queued if WORKER else None,
            on_wait=WORKER.waited if WORKER else None,
        )
        self.runtime = runtime
        app.state.frontend = Frontend(
            runtime,
            self.batcher.submit,
            Limits(
                max_request_bytes=SETTINGS.max_request_bytes,
                max_images_per_request=SETTINGS.max_images_per_request,
                default_top_k=SETTINGS.default_top_k,
                max_top_k=SETTINGS.max_top_k,
            ),
            self.describe,
            ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="decode"),
            RequestObserver() if SETTINGS.monitoring else None,
            is_ready=lambda: LIFECYCLE.ready,
            feedback=self.feedback,
        )
        if WORKER:
            WORKER.loaded(runtime.provider, runtime.provider_options, runtime.load_seconds)
        drain_before_exit(LIFECYCLE, SETTINGS.drain_timeout_s)
        threading.Thread(target=self._warm_up, name="warm-up", daemon=True).start()

    def _warm_up(self) -> None:
        sizes = self.runtime.buckets
        LIFECYCLE.set(WARMING, f"running batch sizes {', '.join(map(str, sizes))} once")
        try:
            self.runtime.warm_up()
        except Exception as error:
            log.exception("warm-up failed; this worker stays unready")
            LIFECYCLE.set(FAILED, f"warm-up failed: {type(error).__name__}")
            return
        if WORKER:
            WORKER.warmed(self.runtime.warmed_batch_sizes, self.runtime.warm_up_seconds)
        LIFECYCLE.set(READY)

    def __is_ready__(self) -> bool:
        return LIFECYCLE.ready

    def describe(self) -> dict:
        """What ``GET /metadata`` answers (besides the request limits)."""
        return {
            **self.runtime.describe(),
            "batching": {
                "max_batch_size": SETTINGS.max_batch_size,
                "buckets": list(self.runtime.buckets),
                "batch_wait_ms": SETTINGS.batch_wait_ms,
                "max_latency_ms": SETTINGS.max_latency_ms,
                "max_queue_size": SETTINGS.max_queue_size,
            },
            "workers": WORKERS,
            "decode_threads": DECODE_THREADS,
            "state": LIFECYCLE.state,
            "monitoring": None
            if self.predictions is None
            else {
                **self.predictions.describe(),
                "feedback": None
                if self.feedback is None
                else {
                    "store_capacity": SETTINGS.feedback_store_size,
                    "max_age_s": SETTINGS.feedback_max_age_s,
                    "window": SETTINGS.feedback_window,
                    "min_samples": SETTINGS.feedback_min_samples,
                    "accuracy_alert_margin": SETTINGS.accuracy_alert_margin,
                },
            },
        }

    @bentoml.on_shutdown
    def close(self) -> None:
        self.batcher.close()
        BUFFER.close()
        if self.feedback is not None:
            self.feedback.store.close()


def prediction_observer(runtime: ClassifierRuntime, profile: dict | None) -> PredictionObserver:
    return PredictionObserver(
        classes=runtime.classes,
        name=runtime.name,
        version=runtime.version,
        provider=runtime.provider,
        precision=runtime.precision,
        profile=profile,
        window=SETTINGS.drift_window,
        min_samples=SETTINGS.drift_min_samples,
        interval=SETTINGS.drift_interval_s,
        thresholds=SETTINGS.drift_thresholds,
    )


def feedback(runtime: ClassifierRuntime, profile: dict | None) -> Feedback:
    """The store every worker shares: in BentoML's per-server runtime folder (emptied when
    the server starts), or a private folder when the service runs alone."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="imgclf-")
    observer = FeedbackObserver(
        capacity=SETTINGS.feedback_store_size,
        min_samples=SETTINGS.feedback_min_samples,
        margin=SETTINGS.accuracy_alert_margin,
    )
    store = FeedbackStore(
        Path(folder) / "imgclf-feedback.sqlite3",
        runtime.classes,
        capacity=SETTINGS.feedback_store_size,
        max_age_s=SETTINGS.feedback_max_age_s,
        window=SETTINGS.feedback_window,
        on_count=observer.stored,
    )
    return Feedback(store, observer, (profile or {}).get("performance"))


ImageClassifier.add_asgi_middleware(LifecycleMiddleware, lifecycle=LIFECYCLE)
ImageClassifier.add_asgi_middleware(PlainErrorsAsJSON)
ImageClassifier.add_asgi_middleware(FlushBeforeScrape)


def served_model() -> tuple[str | None, int | None]:
    frontend = getattr(app.state, "frontend", None)
    return (frontend.card.name, frontend.card.version) if frontend else (None, None)


ImageClassifier.add_asgi_middleware(
    MergeOpenAPIPaths,
    max_top_k=SETTINGS.max_top_k,
    max_images=SETTINGS.max_images_per_request,
    served=served_model,
)
