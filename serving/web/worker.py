"""Starting one worker process: its runtime, batcher, decode pool, observers and feedback
store, warmed in the background so that ``/livez`` answers while ``/readyz`` says
"warming"; and what ``/metadata`` says about it."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from threadpoolctl import threadpool_limits

from monitoring.buffer import BUFFER
from monitoring.feedback import FeedbackStore
from monitoring.observers import (
    FeedbackObserver,
    RequestObserver,
    VersionObserver,
    WorkerObserver,
)
from serving.core.runtime import ClassifierRuntime
from serving.web.context import WorkerContext
from serving.web.feedback import Feedback
from serving.web.lifecycle import FAILED, READY, WARMING, Lifecycle, drain_before_exit
from serving.web.requests import Limits
from serving.web.settings import ServingSettings
from serving.web.sizing import Sizing
from serving.web.supervision import WorkerRoll, die_with_server
from serving.web.version_builder import VersionBuilder
from serving.web.versions import ModelSet

log = logging.getLogger(__name__)


def start_worker(
    settings: ServingSettings,
    model_dir: Path,
    *,
    lifecycle: Lifecycle,
    metrics: WorkerObserver | None,
    sizing: Sizing,
) -> WorkerContext:
    """Load and verify the model (failing start-up at once if it cannot), build the worker's
    parts, and warm every batch bucket on a background thread; then watch the repository's
    version roles (``serving.web.versions``). A worker that cannot start says why on its
    card and waits before it exits, longer after each failure in a row."""
    workers, decode_threads = sizing.workers, sizing.decode_threads
    roll = supervise(metrics, workers)
    with roll.starting() if roll else contextlib.nullcontext():
        if roll is not None:
            lifecycle.census = roll.census
            lifecycle.on_ready(roll.mark)
        if metrics:
            metrics.configured(workers)
            metrics.watch_in_flight(lambda: lifecycle.in_flight)
        if settings.monitoring:
            BUFFER.start()
            # Monitoring's small matrix products (the estimate per batch, the domain classifier
            # in the drift thread) on one BLAS thread: OpenBLAS's own threads would wake and spin
            # on cores that ONNX Runtime and the decoders already use (the per-batch estimate
            # took 0.47 ms with two threads, 0.21 ms with one).
            threadpool_limits(1, user_api="blas")
        versions = ModelSet(
            model_dir,
            builder=VersionBuilder(settings, ort_threads=sizing.ort_threads, metrics=metrics),
            poll_s=settings.version_poll_s,
            retire_after_s=settings.timeout_s + 1,
            observer=VersionObserver() if settings.monitoring else None,
        )
        runtime = versions.live.runtime
        log.info(
            "serving %s; %d workers, %d decode threads each",
            runtime.summary(),
            workers,
            decode_threads,
        )
        feedback = (
            open_feedback(runtime, settings)
            if settings.monitoring and settings.feedback_store_size
            else None
        )

        def describe() -> dict:
            live = versions.live
            predictions = live.predictions
            return {
                **live.runtime.describe(),
                "versions": versions.describe(),
                "batching": {
                    "max_batch_size": live.runtime.max_batch_size,
                    "buckets": list(live.runtime.buckets),
                    "batch_wait_ms": settings.batch_wait_ms,
                    "max_latency_ms": settings.max_latency_ms,
                    "max_queue_size": settings.max_queue_size,
                },
                "workers": workers,
                "decode_threads": decode_threads,
                "batch_decode_bytes": sizing.batch_decode_bytes,
                "state": lifecycle.state,
                # Each worker keeps its own drift window: say whose figures these are. The fleet's
                # figures are on /metrics (the drift gauges take the fullest live worker's).
                "worker": {"pid": os.getpid(), "of": workers}
                | ({"ready": roll.census()["ready"]} if roll else {}),
                "monitoring": None
                if predictions is None
                else {
                    "scope": f"this worker (pid {os.getpid()}) of {workers}; /metrics has them all",
                    **predictions.describe(),
                    "feedback": feedback_settings(feedback, settings),
                },
            }

        def close() -> None:
            if roll is not None:
                roll.leave()
            versions.close()
            BUFFER.close()
            if feedback is not None:
                feedback.store.close()

        worker = WorkerContext(
            versions,
            Limits(
                max_request_bytes=settings.max_request_bytes,
                max_images_per_request=settings.max_images_per_request,
                default_top_k=settings.default_top_k,
                max_top_k=settings.max_top_k,
                timeout_s=settings.timeout_s,
            ),
            describe,
            ThreadPoolExecutor(decode_threads, thread_name_prefix="decode"),
            RequestObserver() if settings.monitoring else None,
            is_ready=lambda: lifecycle.ready,
            feedback=feedback,
            close=close,
            batch_decode_bytes=sizing.batch_decode_bytes,
        )
        if metrics:
            metrics.loaded(runtime.provider, runtime.provider_options, runtime.load_seconds)
        drain_before_exit(lifecycle, settings.drain_window_s, settings.drain_timeout_s)
        threading.Thread(
            target=warm_up, args=(versions, lifecycle, metrics), name="warm-up", daemon=True
        ).start()
        return worker


def server_folder() -> Path | None:
    """The runtime folder of the server this worker belongs to (``serving.web.launch``, or
    BentoML's own), where its metrics, worker cards and feedback store live; None when the
    service runs in-process, without a server around it."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(folder) if folder else None


def supervise(metrics: WorkerObserver | None, workers: int) -> WorkerRoll | None:
    """In a server's worker process (``serving.web.supervision``): die with the server, join
    its roll of workers and report the ones found dead. None in-process (no runtime
    folder: no server around it)."""
    folder = server_folder()
    if folder is None:
        return None
    die_with_server()
    roll = WorkerRoll(folder, workers=workers)
    dead = roll.join()
    for card in dead:
        if "failed" in card:
            log.warning(
                "worker pid %d could not start (%s); pid %d tries again (attempt %d)",
                card["pid"],
                card["failed"],
                os.getpid(),
                card["attempt"] + 1,
            )
        else:
            log.warning(
                "worker pid %d ended without shutting down (killed, out of memory or "
                "crashed: see the kernel log); pid %d replaces it",
                card["pid"],
                os.getpid(),
            )
    if metrics is not None:
        failed_starts = sum("failed" in card for card in dead)
        if failed_starts:
            metrics.failed_to_start(failed_starts)
        if len(dead) > failed_starts:
            metrics.replaced(len(dead) - failed_starts)
    return roll


def warm_up(versions: ModelSet, lifecycle: Lifecycle, metrics) -> None:
    """Run every bucket once, then report ready (or failed, with the reason), and start
    watching the repository's version roles."""
    runtime = versions.live.runtime
    lifecycle.set(WARMING, f"running batch sizes {', '.join(map(str, runtime.buckets))} once")
    try:
        runtime.warm_up()
    except Exception as error:
        log.exception("warm-up failed; this worker stays unready")
        lifecycle.set(FAILED, f"warm-up failed: {type(error).__name__}")
        return
    if metrics:
        metrics.warmed(runtime.warmed_batch_sizes, runtime.warm_up_seconds)
    lifecycle.set(READY)
    versions.start_watching()


def open_feedback(runtime: ClassifierRuntime, settings: ServingSettings) -> Feedback:
    """The store every worker of this server shares: in the server's own runtime folder
    (``serving.web.launch``), a private folder when the service runs alone, or the file
    ``feedback_store_path`` names when several servers are meant to share their labels."""
    folder = server_folder() or Path(tempfile.mkdtemp(prefix="imgclf-"))
    path = settings.feedback_store_path or folder / "imgclf-feedback.sqlite3"
    observer = FeedbackObserver(
        capacity=settings.feedback_store_size,
        min_samples=settings.feedback_min_samples,
        margin=settings.accuracy_alert_margin,
    )
    store = FeedbackStore(
        path,
        runtime.classes,
        capacity=settings.feedback_store_size,
        max_age_s=settings.feedback_max_age_s,
        window=settings.feedback_window,
        on_count=observer.stored,
        on_taken=observer.taken,
        on_error=observer.failed,
    )
    token = settings.feedback_token.get_secret_value() if settings.feedback_token else None
    return Feedback(store, observer, token)


def feedback_settings(feedback: Feedback | None, settings: ServingSettings) -> dict | None:
    if feedback is None:
        return None
    return {
        "store_capacity": settings.feedback_store_size,
        "max_age_s": settings.feedback_max_age_s,
        "window": settings.feedback_window,
        "min_samples": settings.feedback_min_samples,
        "accuracy_alert_margin": settings.accuracy_alert_margin,
        "token_required": settings.feedback_token is not None,
    }
