"""The worker context: what every route of one worker process needs (the versions served,
the decode pool, limits, observers, feedback), the stages of a prediction (decode on the
pool, classify in a batch, copy to the shadow, name each answer for feedback) that
``/predict`` and ``/v2 infer`` share, and ``handle``, which turns every outcome into an
answer and counts it.

Each worker process holds one service instance (``serving/service.py``), whose ``worker``
attribute is this context; routes find it through ``bentoml.get_current_service()``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor

import numpy as np
from bentoml import get_current_service  # once: bentoml's module attributes are lazy
from bentoml.exceptions import BentoMLException
from starlette.requests import Request
from starlette.responses import Response

from monitoring.assessment import Answers
from serving.core.errors import ImgclfError, InvalidImageError
from serving.core.model_card import ModelCard
from serving.core.runtime import ClassifierRuntime
from serving.web.batcher import Encoded
from serving.web.requests import Limits, Upload, safe_text
from serving.web.responses import INTERNAL_ERROR, JSONAnswer
from serving.web.served import ServedVersion

log = logging.getLogger(__name__)


class WorkerContext:
    """What the routes need from their worker: the versions to lease (each with its runtime
    to decode and format answers and its batcher to classify with), a thread pool to decode
    on, and what ``/metadata`` says. Built by ``serving.web.worker.start_worker``."""

    def __init__(
        self,
        versions,
        limits: Limits,
        describe: Callable[[], dict],
        decoder: Executor,
        observer=None,
        is_ready: Callable[[], bool] = lambda: True,
        feedback=None,
        close: Callable[[], None] = lambda: None,
        batch_decode_bytes: int = 0,
    ) -> None:
        #: The versions served (``serving.web.versions.ModelSet``): a request leases one.
        self.versions = versions
        #: Stops the worker's threads and closes its stores (the service's shutdown hook).
        self.close = close
        #: The worker's ``serving.web.feedback.Feedback`` (store and metrics), or None when off.
        self.feedback = feedback
        self.is_ready = is_ready
        self.limits = limits
        self.describe = describe
        self.decoder = decoder
        #: A request of one image up to this size has it decoded by its batch (``prepare``).
        self.batch_decode_bytes = batch_decode_bytes
        self.observer = observer
        #: One ``/explain`` at a time per worker (``serving.web.explanations``).
        self.explaining = asyncio.Semaphore(1)

    @property
    def live_runtime(self) -> ClassifierRuntime:
        """The live version's runtime, for what is not one request's (metadata, OpenAPI)."""
        return self.versions.live.runtime

    async def prepare(self, uploads: list[Upload], runtime: ModelCard) -> np.ndarray | Encoded:
        """A request's images as its batch takes them: one image up to
        ``batch_decode_bytes`` still encoded, for the batch's inference thread to decode (a
        digit upload decodes in about 0.1 ms, less than the hop to a decode thread and back
        costs the loop and the threads: 10 % more requests a second on 2 cores); anything
        else decoded on the decode pool, side by side (``decode_all``)."""
        if len(uploads) == 1 and len(uploads[0].data) <= self.batch_decode_bytes:
            decoded = self.observer.decoded if self.observer is not None else None
            return Encoded(uploads[0].data, runtime.preprocess, decoded)
        return await self.decode_all(uploads, runtime)

    async def decode_all(self, uploads: list[Upload], runtime: ModelCard) -> np.ndarray:
        """Decode every image side by side; the first bad one fails the request, named by its
        index (and file name) when there are several."""
        if len(uploads) == 1:
            decoded = [await self.decode(uploads[0], runtime)]
        else:
            decoded = await asyncio.gather(
                *(self.decode(upload, runtime) for upload in uploads), return_exceptions=True
            )
        for index, (upload, result) in enumerate(zip(uploads, decoded, strict=True)):
            if isinstance(result, InvalidImageError) and len(uploads) > 1:
                name = f" ({safe_text(upload.filename, 60)})" if upload.filename else ""
                result.args = (f"image {index}{name}: {result.message}",)
            if isinstance(result, BaseException):
                raise result
        # One image is a view, not a copy: np.stack releases the GIL, and the loop then waits
        # to take it back (ModelCard.top_k says why that matters).
        return decoded[0][np.newaxis] if len(decoded) == 1 else np.stack(decoded)

    async def decode(self, upload: Upload, runtime: ModelCard) -> np.ndarray:
        """Decode and preprocess one image for ``runtime``'s version on the decode pool
        (Pillow releases the GIL)."""
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        array = await loop.run_in_executor(self.decoder, runtime.preprocess, upload.data)
        if self.observer is not None:
            self.observer.decoded(time.perf_counter() - started)
        return array


def prediction_ids(worker: WorkerContext, rid: str, answered: Answers, version: int) -> list[str]:
    """One id per image (the request's own for one image, ``id/index`` for several), each
    kept with its predicted class, the version that predicted it and the label-free
    estimate's expected correctness (``Assessed`` answers) for ``POST /feedback``."""
    rows = np.asarray(answered).tolist()
    ids = [rid] if len(rows) == 1 else [f"{rid}/{index}" for index in range(len(rows))]
    if worker.feedback is not None:
        # The label-free estimate's expected correctness of each answer, computed when the
        # store writes the rows (off the request path), if the answers carry one. The classes
        # in Python, not by NumPy's argmax (which releases the GIL: ModelCard.top_k).
        predicted = [max(range(len(row)), key=row.__getitem__) for row in rows]
        worker.feedback.store.remember(ids, predicted, version, getattr(answered, "expected", None))
    return ids


async def classify(
    worker: WorkerContext, served: ServedVersion, images: np.ndarray | Encoded, blobs, rid: str
) -> tuple[np.ndarray, list[str]]:
    """The stages after ``WorkerContext.prepare``, as ``/predict`` and ``/v2 infer`` both
    run them: classify ``images`` in one batch with whatever else is queued on the leased
    version, offer a copy to the shadow version (if there is one) once the answer is known,
    and name each answer for ``POST /feedback``: (probabilities, one id per image)."""
    answered = await served.classify(images)
    if isinstance(images, Encoded):
        images = images.images  # decoded by its batch
    probabilities = np.asarray(answered)
    worker.versions.offer_shadow(served, images, blobs, probabilities)
    return probabilities, prediction_ids(worker, rid, answered, served.version)


async def predict_uploads(worker: WorkerContext, uploads: list[Upload], top_k: int, rid: str):
    """Decode every image (a bad one fails this request alone), then classify them, all on
    the live version leased for this request."""
    with worker.versions.lease() as served:
        runtime = served.runtime
        images = await worker.prepare(uploads, runtime)
        blobs = [upload.data for upload in uploads]
        probabilities, ids = await classify(worker, served, images, blobs, rid)
        return [
            {
                "label": best[0]["label"],
                "score": best[0]["score"],
                "top_k": best,
                "model_version": served.version,
                "request_id": image_id,
            }
            for best, image_id in zip(runtime.top_k(probabilities, top_k), ids, strict=True)
        ]


def starting() -> JSONAnswer:
    """The answer before this process's service instance exists."""
    return JSONAnswer(
        {"error": "the service is starting"}, status_code=503, headers={"Retry-After": "1"}
    )


def current_worker() -> WorkerContext | None:
    """This process's worker context, or None while the service is starting."""
    try:
        return get_current_service().worker
    except (BentoMLException, AttributeError):
        return None


async def handle(request: Request, endpoint: str, work) -> Response:
    """Run ``work(worker)`` for ``endpoint``: its result (a Response, or JSON content), or
    ``{"error": ...}`` with the error's status; every outcome counted by endpoint."""
    worker = current_worker()
    if worker is None:
        return starting()
    started = time.perf_counter()

    def count(status: int, reason: str | None = None) -> None:
        count_request(worker, endpoint, started, status, reason)

    try:
        result = await work(worker)
        response = result if isinstance(result, Response) else JSONAnswer(result)
        count(response.status_code)
        return response
    except asyncio.CancelledError:
        # BentoML's timeout cancels the handler and answers 504 itself; anything else that
        # cancels a request (a shutdown past its grace period) is counted as 499, nginx's
        # "client closed request". Either way the request is counted, then cancelled.
        if time.perf_counter() - started >= 0.9 * worker.limits.timeout_s:
            count(504, "timeout")
        else:
            count(499, "cancelled")
        raise
    except ImgclfError as error:
        reason, status, message = error.reason, error.status_code, error.message
        details = error.details or {}
        headers = error.headers
        log.info("%s rejected (%s): %s", endpoint, reason, safe_text(message, 300))
    except Exception:
        log.exception("%s failed", endpoint)
        reason, status, message = "internal", 500, INTERNAL_ERROR
        details, headers = {}, None
    count(status, reason)
    if status == 503:
        headers = {**(headers or {}), "Retry-After": "1"}
    return JSONAnswer({"error": message, **details}, status_code=status, headers=headers)


def count_request(
    worker: WorkerContext, endpoint: str, started: float, status: int, reason: str | None = None
) -> None:
    """One request to ``endpoint`` answered with the HTTP ``status`` (a gRPC call: its HTTP
    equivalent), and why when it failed; ``started``: its ``time.perf_counter()``."""
    if worker.observer is not None:
        if reason is not None:
            worker.observer.error(endpoint, reason)
        worker.observer.request(endpoint, status, time.perf_counter() - started)


def service_method(name: str):
    """A Starlette endpoint calling ``name`` on this process's service instance, so that the
    routes can be methods of the service class (``serving/service.py``)."""

    async def endpoint(request: Request) -> Response:
        try:
            service = get_current_service()
        except BentoMLException:
            return starting()
        return await getattr(service, name)(request)

    endpoint.__name__ = name
    return endpoint
