"""The Open Inference Protocol (KServe V2, Triton's HTTP API) on the same batching path as
``/predict``: health, server and model metadata, Triton's model configuration, and ``infer``
with JSON tensors, the binary tensor data extension and the classification extension.

One model, named as in ``metadata.json``, its published version as the model version. Its
input ``image`` takes encoded images (``BYTES``, shape ``[N, 1]`` or ``[N]``; decoded by the
same preprocessing contract as ``/predict``) or pixels (``FP32`` or ``UINT8``,
``[N, H, W, 3]``, the graph's own input); its output ``probabilities`` is ``FP32 [N, K]``.
Errors are ``{"error": "..."}``: 400 for a bad request, 404 for an unknown model or version,
503 when not ready or overloaded. tritonclient sends no Content-Type: the body is read raw.
Each answer's ``X-Request-ID`` (the request's ``id`` when it is safe) names its predictions
for ``POST /feedback``: that id for one image, ``id/index`` for several.
"""

from __future__ import annotations

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from serving import __version__
from serving.core.errors import ImgclfError, NotFoundError
from serving.core.model_dir import INPUT_NAME, OUTPUT_NAME
from serving.web.context import WorkerContext, classify, handle
from serving.web.oip_tensors import (
    HEADER_LENGTH,
    build_response,
    input_images,
    quoted,
    requested_outputs,
    split_request,
)
from serving.web.requests import REQUEST_ID_HEADER, read_body, request_id

EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration"]


def oip_routes() -> list[Route]:
    """The ``/v2`` routes, each with and without ``/versions/{version}``."""
    routes = [
        Route("/v2", server_metadata, methods=["GET"]),
        Route("/v2/health/live", server_live, methods=["GET"]),
        Route("/v2/health/ready", server_ready, methods=["GET"]),
    ]
    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        routes += [
            Route(base, model_metadata, methods=["GET"]),
            Route(base + "/ready", model_ready, methods=["GET"]),
            Route(base + "/config", model_config, methods=["GET"]),
            Route(base + "/infer", infer, methods=["POST"]),
        ]
    return routes


async def server_metadata(request: Request) -> Response:
    async def work(worker: WorkerContext):
        return {"name": "imgclf", "version": __version__, "extensions": EXTENSIONS}

    return await handle(request, "v2_server_metadata", work)


async def server_live(request: Request) -> Response:
    return await handle(request, "v2_health", _live)


async def _live(worker: WorkerContext):
    return {"live": True}


async def server_ready(request: Request) -> Response:
    async def work(worker: WorkerContext):
        return _ready(worker)

    return await handle(request, "v2_health", work)


async def model_ready(request: Request) -> Response:
    async def work(worker: WorkerContext):
        with _leased(request, worker):
            return _ready(worker)

    return await handle(request, "v2_model_ready", work)


def _ready(worker: WorkerContext) -> dict:
    if not worker.is_ready():
        raise ImgclfError("not ready (loading, warming up or draining)", reason="not_ready")
    return {"ready": True}


async def model_metadata(request: Request) -> Response:
    async def work(worker: WorkerContext):
        with _leased(request, worker) as served:
            runtime = served.runtime
        height, width, channels = runtime.spec.input_shape
        return {
            "name": runtime.name,
            # Live first, then the shadow: both answer /versions/{v}/infer.
            "versions": [
                str(v) for v in sorted(worker.versions.versions, key=lambda v: v != served.version)
            ],
            "platform": "onnxruntime_onnx",
            "inputs": [
                {"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, height, width, channels]}
            ],
            "outputs": [
                {"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, len(runtime.classes)]}
            ],
            "parameters": {
                "input_datatypes": ["FP32", "UINT8", "BYTES"],
                "bytes_input": "encoded images, shape [-1, 1]: decoded as /predict decodes them",
            },
        }

    return await handle(request, "v2_model_metadata", work)


async def model_config(request: Request) -> Response:
    """Triton's model configuration, enough for ``image_client.py`` and ``perf_analyzer``."""

    async def work(worker: WorkerContext):
        with _leased(request, worker) as served:
            runtime = served.runtime
        batching = worker.describe().get("batching", {})
        # A request may hold up to max_images_per_request images: that is the batch size a
        # Triton client may send (the server batches requests together beyond it).
        height, width, channels = runtime.spec.input_shape
        return {
            "name": runtime.name,
            "platform": "onnxruntime_onnx",
            "backend": "onnxruntime",
            "version_policy": {"specific": {"versions": list(map(str, worker.versions.versions))}},
            "max_batch_size": worker.limits.max_images_per_request,
            "input": [
                {
                    "name": INPUT_NAME,
                    "data_type": "TYPE_FP32",
                    "format": "FORMAT_NHWC",
                    "dims": [height, width, channels],
                }
            ],
            "output": [
                {
                    "name": OUTPUT_NAME,
                    "data_type": "TYPE_FP32",
                    "dims": [len(runtime.classes)],
                    "labels": runtime.classes,
                }
            ],
            "dynamic_batching": {
                "preferred_batch_size": batching.get("buckets", []),
                "max_queue_delay_microseconds": int(batching.get("batch_wait_ms", 0) * 1000),
            },
        }

    return await handle(request, "v2_model_config", work)


async def infer(request: Request) -> Response:
    async def work(worker: WorkerContext):
        with _leased(request, worker) as served:
            runtime = served.runtime
            body = await read_body(request, worker.limits.max_request_bytes)
            header, binary = split_request(
                request.headers.get(HEADER_LENGTH),
                body,
                max_images=worker.limits.max_images_per_request,
                pixels_per_image=int(np.prod(runtime.spec.input_shape)),
            )
            outputs = requested_outputs(header, len(runtime.classes))
            images, blobs = await input_images(worker, runtime, header, binary)
            rid = request_id(request, header.get("id"))
            probabilities, _ = await classify(worker, served, images, blobs, rid)
            response = build_response(runtime, header, outputs, probabilities)
            response.headers[REQUEST_ID_HEADER] = rid
            return response

    return await handle(request, "v2_infer", work)


def _leased(request: Request, worker: WorkerContext):
    """The version a ``/v2/models/{name}[/versions/{version}]`` route names, leased for the
    request: the live one without a version, else any loaded one (live or shadow)."""
    runtime = worker.live_runtime
    name = request.path_params["name"]
    version = request.path_params.get("version")
    if name != runtime.name:
        raise NotFoundError(f"unknown model {quoted(name)}; this server serves {runtime.name!r}")
    if version in (None, ""):
        return worker.versions.lease()
    loaded = worker.versions.versions
    if not version.isdigit() or int(version) not in loaded:
        raise NotFoundError(
            f"unknown version {quoted(version)} of model {runtime.name!r}; this server serves "
            f"version{'s' if len(loaded) > 1 else ''} {', '.join(map(str, loaded))}"
        )
    return worker.versions.lease(int(version))
