"""The BentoML service, the API: one class, one process per worker, each holding its own
ONNX Runtime runtime and batching its own concurrent requests.

    bentoml serve serving.service:ImageClassifier        # or: imgclf serve --model DIR

The routes are plain Starlette endpoints mounted on the service (measured faster than
BentoML's typed APIs, and they read raw bodies, never fetch URLs and answer every mistake as
``{"error": ...}``); BentoML adds ``/livez`` and ``/docs.json``; ``/metrics`` is answered
by ``monitoring.scrape``. The model comes from BentoML's model store (``IMGCLF_BENTO_MODEL``,
what ``bentoml build`` packages) or a published directory (``IMGCLF_MODEL_DIR``). No
TensorFlow anywhere on this path."""

from __future__ import annotations

import logging
from pathlib import Path

import bentoml
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from monitoring.observers import WorkerObserver
from monitoring.scrape import ScrapeEndpoint
from serving.core.errors import ImgclfError
from serving.core.explain import as_json, overlay_png
from serving.core.sessions import expected_provider
from serving.web import http_limits
from serving.web.context import current_worker, handle, predict_uploads, service_method
from serving.web.explanations import explain_options, explain_upload
from serving.web.feedback import feedback_routes
from serving.web.hot_path import around_bentoml
from serving.web.lifecycle import Lifecycle, LifecycleMiddleware
from serving.web.middleware import MergeOpenAPIPaths, PlainErrorsAsJSON, build_app
from serving.web.oip import oip_routes
from serving.web.requests import REQUEST_ID_HEADER, parse_top_k, read_uploads, request_id
from serving.web.responses import JSONAnswer
from serving.web.serve_command import check_servable
from serving.web.settings import ServingSettings
from serving.web.sizing import sizing_for
from serving.web.supervision import replace_dead_workers
from serving.web.worker import start_worker

SETTINGS = ServingSettings.from_env()
PROVIDER = expected_provider(SETTINGS.provider)
#: Workers, and each one's decode threads, batch decoding and ONNX Runtime threads.
SIZING = sizing_for(SETTINGS, PROVIDER)
WORKER_METRICS = WorkerObserver() if SETTINGS.monitoring else None
#: The model store's model, which ``bentoml build`` packages (a class attribute below).
STORED_MODEL = None if SETTINGS.model_dir else bentoml.models.BentoModel(SETTINGS.bento_model)
LIFECYCLE = Lifecycle(on_ready=WORKER_METRICS.ready if WORKER_METRICS else None)


@bentoml.service(
    name="imgclf",
    workers=SIZING.workers,
    traffic={"timeout": SETTINGS.timeout_s}
    | ({"max_concurrency": SETTINGS.max_concurrency} if SETTINGS.max_concurrency else {}),
    # OpenTelemetry spans cost about 0.2 ms per request even when none is sampled.
    tracing={} if SETTINGS.tracing else {"excluded_urls": ".*"},
    logging={"access": {"enabled": SETTINGS.access_log}},
)
class ImageClassifier:
    stored_model = STORED_MODEL

    def __init__(self) -> None:
        # BentoML's logging keeps the root at WARNING: let our lifecycle lines through.
        logging.getLogger("serving").setLevel(logging.INFO)
        self.worker = start_worker(
            SETTINGS,
            SETTINGS.model_dir or Path(self.stored_model.path),
            lifecycle=LIFECYCLE,
            metrics=WORKER_METRICS,
            sizing=SIZING,
        )

    @bentoml.on_startup
    async def start_grpc(self) -> None:
        """The Open Inference Protocol over gRPC on this worker's event loop, when
        ``IMGCLF_GRPC_PORT`` is set (``serving.web.oip_grpc``)."""
        self.grpc = None
        if SETTINGS.grpc_port is not None:  # grpc is imported only when it is on
            from serving.web.oip_grpc import start_grpc_server

            self.grpc = await start_grpc_server(self.worker, LIFECYCLE, SETTINGS)

    async def predict(self, request: Request) -> Response:
        """``POST /predict``: one image (raw body or multipart field ``image``), ``top_k``
        as a query or form field -> ``{label, score, top_k, model_version, request_id}``."""

        async def work(worker):
            uploads, form = await read_uploads(
                request, field="image", limits=worker.limits, raw_allowed=True
            )
            if len(uploads) > 1:
                raise ImgclfError(
                    "send one image to /predict (several: /predict_batch)",
                    reason="too_many_images",
                )
            rid = request_id(request)
            top_k = parse_top_k(request, form, worker.limits)
            answer = (await predict_uploads(worker, uploads, top_k, rid))[0]
            return JSONAnswer(answer, headers={REQUEST_ID_HEADER: rid})

        return await handle(request, "predict", work)

    async def predict_batch(self, request: Request) -> Response:
        """``POST /predict_batch``: multipart fields ``images`` -> a list of answers, in
        order; a bad image fails the request, named by its index."""

        async def work(worker):
            uploads, form = await read_uploads(
                request, field="images", limits=worker.limits, raw_allowed=False
            )
            if len(uploads) > worker.limits.max_images_per_request:
                raise ImgclfError(
                    f"{len(uploads)} images in one request; the limit is "
                    f"{worker.limits.max_images_per_request}",
                    reason="too_many_images",
                )
            rid = request_id(request)
            top_k = parse_top_k(request, form, worker.limits)
            answers = await predict_uploads(worker, uploads, top_k, rid)
            return JSONAnswer(answers, headers={REQUEST_ID_HEADER: rid})

        return await handle(request, "predict_batch", work)

    async def explain(self, request: Request) -> Response:
        """``POST /explain``: one image as ``/predict`` takes it; ``class`` (default: top-1),
        ``method`` (``cam`` where the version has it, else ``occlusion``) -> ``{label, score,
        class, method, map, model_version, request_id}``, ``map`` in [0, 1] (the feature map's
        size, or 7x7); ``format=png``: the image with the map laid over it."""

        async def work(worker):
            uploads, form = await read_uploads(
                request, field="image", limits=worker.limits, raw_allowed=True
            )
            if len(uploads) > 1:
                raise ImgclfError("send one image to /explain", reason="too_many_images")
            method, wanted, answer_format = explain_options(request, form)
            rid = request_id(request)
            found, image = await explain_upload(worker, uploads[0], method, wanted, rid)
            headers = {REQUEST_ID_HEADER: rid}
            if answer_format == "png":
                picture = overlay_png(image, found["map"])
                return Response(picture, media_type="image/png", headers=headers)
            return JSONAnswer(as_json(found), headers=headers)

        return await handle(request, "explain", work)

    async def metadata(self, request: Request) -> Response:
        """``GET /metadata``: the model, its provider and sessions, batching, limits and
        this worker's monitoring."""

        async def work(worker):
            return {**worker.describe(), "limits": vars(worker.limits)}

        return await handle(request, "metadata", work)

    @bentoml.on_deployment
    def prepare_server() -> None:  # in the server's main process, before any worker starts
        replace_dead_workers()
        check_servable(SETTINGS, SETTINGS.model_dir or Path(STORED_MODEL.resolve().path))

    @bentoml.on_shutdown
    def close(self) -> None:
        if getattr(self, "grpc", None) is not None:
            self.grpc.stop_threadsafe(0)
        self.worker.close()


def served_model() -> tuple[str | None, int | None]:
    worker = current_worker()
    runtime = worker.live_runtime if worker else None
    return (runtime.name, runtime.version) if runtime else (None, None)


ROUTES = [
    Route("/predict", service_method("predict"), methods=["POST"]),
    Route("/predict_batch", service_method("predict_batch"), methods=["POST"]),
    Route("/explain", service_method("explain"), methods=["POST"]),
    Route("/metadata", service_method("metadata"), methods=["GET"]),
    *feedback_routes(),  # POST /feedback (delayed labels), GET /feedback (their accuracy)
    *oip_routes(),  # /v2/...: the Open Inference Protocol, on the same batcher
]
ImageClassifier.mount_asgi_app(build_app(ROUTES), path="/")
ImageClassifier.add_asgi_middleware(LifecycleMiddleware, lifecycle=LIFECYCLE)  # /readyz, drain
ImageClassifier.add_asgi_middleware(PlainErrorsAsJSON)
ImageClassifier.add_asgi_middleware(ScrapeEndpoint)  # /metrics: every worker's, this one's so far
ImageClassifier.add_asgi_middleware(
    MergeOpenAPIPaths,
    max_top_k=SETTINGS.max_top_k,
    max_images=SETTINGS.max_images_per_request,
    served=served_model,
)
http_limits.install(  # before BentoML starts this worker's uvicorn
    SETTINGS.max_header_bytes,
    SETTINGS.keep_alive_timeout_s,
    SETTINGS.header_timeout_s,
    around_app=around_bentoml(SETTINGS, ROUTES, LIFECYCLE, SIZING.workers),  # our routes, directly
)
