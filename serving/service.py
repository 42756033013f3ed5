"""BentoML services: ``ImageClassifier`` (the public HTTP API) in front of ``OnnxModel``
(ONNX Runtime with adaptive batching).

    bentoml serve serving.service:ImageClassifier        # or: imgclf serve --model DIR

The public service reads and validates requests and decodes images (``serving/http.py``);
``OnnxModel`` runs in its own worker processes, so decoding and inference use different cores
and requests from every HTTP worker are batched together. The model comes from BentoML's
model store (``IMGCLF_BENTO_MODEL``, what ``bentoml build`` packages) or from a published
directory (``IMGCLF_MODEL_DIR``). No TensorFlow anywhere on this path.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path

import aiohttp
import bentoml
import numpy as np
import psutil
from bentoml.exceptions import ServiceUnavailable

from monitoring.observers import PredictionObserver, RequestObserver
from serving.http import Frontend, Limits, build_app
from serving.openapi import MergeOpenAPIPaths
from serving.runtime import ClassifierRuntime, ModelCard
from serving.settings import ServingSettings

log = logging.getLogger(__name__)

SETTINGS = ServingSettings.from_env()
CONNECTION_RETRIES = 2
STORED_MODEL = None if SETTINGS.model_dir else bentoml.models.BentoModel(SETTINGS.bento_model)
TRAFFIC = {"timeout": SETTINGS.timeout_s} | (
    {"max_concurrency": SETTINGS.max_concurrency} if SETTINGS.max_concurrency else {}
)


def model_dir(stored_model) -> Path:
    return SETTINGS.model_dir if SETTINGS.model_dir else Path(stored_model.path)


@bentoml.service(
    name="imgclf-model",
    workers=SETTINGS.model_workers,
    traffic=TRAFFIC,
    # The calling side's session is replaced every max_requests calls (see classify below).
    runner_connection={"max_requests": 1_000_000_000, "max_age": 3600.0},
    # An internal hop: the public service logs and measures each request already.
    logging={"access": {"enabled": False}},
    metrics={"enabled": False},
)
class OnnxModel:
    stored_model = STORED_MODEL

    def __init__(self) -> None:
        # Loading (hashes, session, graph checks) fails start-up at once; warm-up runs in the
        # background so /livez answers while /readyz stays 503 until the model is warm.
        self.runtime = ClassifierRuntime.from_settings(model_dir(self.stored_model), SETTINGS)
        self.observer = prediction_observer(self.runtime) if SETTINGS.monitoring else None
        self._last_call = time.monotonic()
        threading.Thread(target=self._warm_up, name="warm-up", daemon=True).start()
        self._outlive_http_workers()

    def _outlive_http_workers(self) -> None:
        """BentoML's process manager sends SIGTERM to every service at once, so HTTP workers
        still draining their requests would lose the model. Pass SIGTERM on to uvicorn only
        once they have exited and classify has been idle briefly (or after
        ``drain_timeout_s``)."""
        if threading.current_thread() is not threading.main_thread():
            return  # in-process (tests): no signals to handle
        stop_now = signal.getsignal(signal.SIGTERM)
        if not callable(stop_now):
            return

        def when_drained(signum, frame) -> None:
            def wait_then_stop() -> None:
                deadline = time.monotonic() + SETTINGS.drain_timeout_s
                while time.monotonic() < deadline and (
                    http_workers_alive() or time.monotonic() - self._last_call < 0.5
                ):
                    time.sleep(0.05)
                stop_now(signum, frame)

            threading.Thread(target=wait_then_stop, name="drain", daemon=True).start()

        signal.signal(signal.SIGTERM, when_drained)

    def _warm_up(self) -> None:
        try:
            self.runtime.warm_up()
        except Exception:
            log.exception("warm-up failed; the model service stays unready")

    def __is_ready__(self) -> bool:
        return self.runtime.ready

    @bentoml.api(
        batchable=True,
        batch_dim=0,
        max_batch_size=SETTINGS.max_batch_size,
        max_latency_ms=SETTINGS.max_latency_ms,
    )
    def classify(self, images: np.ndarray) -> np.ndarray:
        self._last_call = time.monotonic()
        started = time.perf_counter()
        probabilities = self.runtime.predict(images)
        if self.observer is not None:
            self.observer.record(images, probabilities, time.perf_counter() - started)
        return probabilities

    @bentoml.api
    def describe(self) -> dict:
        return self.runtime.describe()


def http_workers_alive() -> bool:
    """Whether a worker of another service (the HTTP workers) still runs beside this process.
    Under BentoML's arbiter every service's workers are sibling processes started as
    ``-m _bentoml_impl.worker.service ... --service-name NAME``."""
    me = psutil.Process()
    parent = me.parent()
    if parent is None:
        return False
    mine = _service_name(me.cmdline())
    for sibling in parent.children():
        try:
            command = sibling.cmdline()
        except psutil.Error:
            continue
        if "_bentoml_impl.worker.service" in command and _service_name(command) != mine:
            return True
    return False


def _service_name(command: list[str]) -> str | None:
    return command[command.index("--service-name") + 1] if "--service-name" in command else None


def prediction_observer(runtime: ClassifierRuntime) -> PredictionObserver:
    return PredictionObserver(
        classes=runtime.classes,
        name=runtime.name,
        version=runtime.version,
        provider=runtime.provider,
        precision=runtime.precision,
        profile=runtime.reference_profile(),
        window=SETTINGS.drift_window,
        min_samples=SETTINGS.drift_min_samples,
        interval=SETTINGS.drift_interval_s,
    )


app = build_app()


@bentoml.service(name="imgclf", workers=SETTINGS.workers, traffic=TRAFFIC)
@bentoml.asgi_app(app, path="/")
class ImageClassifier:
    model = bentoml.depends(OnnxModel)
    stored_model = STORED_MODEL

    def __init__(self) -> None:
        card = ModelCard(
            model_dir(self.stored_model),
            max_image_bytes=SETTINGS.max_image_bytes,
            max_image_pixels=SETTINGS.max_image_pixels,
        )
        limits = Limits(
            max_request_bytes=SETTINGS.max_request_bytes,
            max_images_per_request=SETTINGS.max_images_per_request,
            default_top_k=SETTINGS.default_top_k,
            max_top_k=SETTINGS.max_top_k,
        )
        self._description: dict | None = None
        observer = RequestObserver() if SETTINGS.monitoring else None
        self.frontend = Frontend(card, self.classify, limits, self.describe_model, observer)
        app.state.frontend = self.frontend

    async def classify(self, images: np.ndarray) -> np.ndarray:
        # Looked up per call: BentoML connects the remote proxy after __init__. BentoML 1.4.40
        # closes its client session every 100 calls while other calls still use it (issues
        # #5544, #5540, #4971): those fail with a connection error, so an idempotent call is
        # retried on a fresh session.
        for attempt in range(CONNECTION_RETRIES + 1):
            try:
                return await self.model.to_async.classify(images)
            except (aiohttp.ClientConnectionError, RuntimeError) as error:
                closed = isinstance(error, aiohttp.ClientConnectionError) or "closed" in str(error)
                if not closed:
                    raise
                if attempt == CONNECTION_RETRIES:
                    # The model service is gone (stopping, or crashed): a retryable 503.
                    raise ServiceUnavailable("the model service is unavailable") from error
                log.debug("retrying classify after %s", type(error).__name__)
        raise AssertionError("unreachable")

    async def describe_model(self) -> dict:
        if self._description is None:
            self._description = await self.model.to_async.describe()
        return self._description


ImageClassifier.add_asgi_middleware(
    MergeOpenAPIPaths,
    max_top_k=SETTINGS.max_top_k,
    max_images=SETTINGS.max_images_per_request,
)
