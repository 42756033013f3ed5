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

from serving.web import oip_model
from serving.web.context import WorkerContext, handle
from serving.web.oip_tensors import HEADER_LENGTH, build_response, split_request
from serving.web.requests import REQUEST_ID_HEADER, read_body, request_id


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
        return oip_model.server_metadata()

    return await handle(request, "v2_server_metadata", work)


async def server_live(request: Request) -> Response:
    async def work(worker: WorkerContext):
        return {"live": True}

    return await handle(request, "v2_health", work)


async def server_ready(request: Request) -> Response:
    async def work(worker: WorkerContext):
        return oip_model.check_ready(worker)

    return await handle(request, "v2_health", work)


async def model_ready(request: Request) -> Response:
    async def work(worker: WorkerContext):
        with _leased(request, worker):
            return oip_model.check_ready(worker)

    return await handle(request, "v2_model_ready", work)


async def model_metadata(request: Request) -> Response:
    async def work(worker: WorkerContext):
        with _leased(request, worker) as served:
            return oip_model.model_metadata(worker, served)

    return await handle(request, "v2_model_metadata", work)


async def model_config(request: Request) -> Response:
    async def work(worker: WorkerContext):
        with _leased(request, worker) as served:
            return oip_model.model_config(worker, served)

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
            rid = request_id(request, header.get("id"))
            probabilities, outputs = await oip_model.infer(worker, served, header, binary, rid)
            response = build_response(runtime, header, outputs, probabilities)
            response.headers[REQUEST_ID_HEADER] = rid
            return response

    return await handle(request, "v2_infer", work)


def _leased(request: Request, worker: WorkerContext):
    return oip_model.lease_named(
        worker, request.path_params["name"], request.path_params.get("version")
    )
