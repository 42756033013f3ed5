"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` (Triton's
service, of which KServe's and MLServer's are subsets), beside HTTP in every worker.

A ``grpc.aio`` server per worker process, started by the service's startup hook on the
worker's own event loop, so that its calls share that worker's versions, batcher, decode
pool, limits, metrics and feedback ids with ``/predict`` and ``/v2`` over HTTP (a batch may
hold both). Every worker binds the same port (``SO_REUSEPORT``): the kernel spreads
*connections* over the workers, and a gRPC client keeps one connection for all its calls,
so spread a client's load with a connection per worker, or a proxy in front
(docs/open-inference-protocol.md).

Answers are those of HTTP ``/v2`` (``serving.web.oip_model``). Errors are gRPC status codes
with the same message (``STATUS_CODES``); a malformed request is never ``INTERNAL``.
Health follows ``/readyz``: ``ServerReady`` says false while the worker warms up or
drains. On SIGTERM the server keeps answering through the drain window, then stops
accepting calls and finishes those in flight (``GrpcServer.stop``).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from serving.core.errors import ImgclfError
from serving.oip_proto import grpc_service_pb2 as pb
from serving.oip_proto import model_config_pb2
from serving.web import oip_model
from serving.web.context import WorkerContext, count_request
from serving.web.lifecycle import Lifecycle
from serving.web.oip_grpc_tensors import infer_response, request_header
from serving.web.requests import REQUEST_ID_HEADER, request_id
from serving.web.responses import INTERNAL_ERROR
from serving.web.settings import ServingSettings

log = logging.getLogger(__name__)

#: The gRPC status of each HTTP status the service answers a mistake or a refusal with.
STATUS_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


#: The calls a Triton or KServe client makes; the service's others answer UNIMPLEMENTED.
SERVED_CALLS = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelConfig",
    "ModelInfer",
)
SERVICE = "inference.GRPCInferenceService"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Unreadable:
    """A request whose bytes are not the message its call takes (the generated handlers
    would answer INTERNAL)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def service_handler(servicer: InferenceService) -> grpc.GenericRpcHandler:
    """``SERVED_CALLS`` of ``servicer`` as ``inference.GRPCInferenceService``, each request
    parsed leniently: bytes that are no such message reach the call as ``Unreadable``."""
    methods = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    handlers = {}
    for name in SERVED_CALLS:
        request_type = getattr(pb, methods[name].input_type.name)
        response_type = getattr(pb, methods[name].output_type.name)
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=_lenient(request_type),
            response_serializer=response_type.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


def _lenient(message_type):
    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as error:
            return Unreadable(error)

    return parse


class InferenceService:
    """What each call answers (``SERVED_CALLS``)."""

    def __init__(self, worker: WorkerContext, lifecycle: Lifecycle) -> None:
        self.worker = worker
        self.lifecycle = lifecycle

    async def ServerLive(self, request, context):  # noqa: N802 - the protocol's names
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=self.worker.is_ready())

    async def ModelReady(self, request, context):  # noqa: N802
        async def work():
            _readable(request)
            with oip_model.lease_named(self.worker, request.name, request.version):
                return pb.ModelReadyResponse(ready=self.worker.is_ready())

        return await self._answer(context, "grpc_model_ready", work, counted=False)

    async def ServerMetadata(self, request, context):  # noqa: N802
        async def work():
            return json_format.ParseDict(oip_model.server_metadata(), pb.ServerMetadataResponse())

        return await self._answer(context, "grpc_server_metadata", work, counted=False)

    async def ModelMetadata(self, request, context):  # noqa: N802
        async def work():
            answer = self._describe(request, oip_model.model_metadata)
            return json_format.ParseDict(
                answer, pb.ModelMetadataResponse(), ignore_unknown_fields=True
            )

        return await self._answer(context, "grpc_model_metadata", work, counted=False)

    async def ModelConfig(self, request, context):  # noqa: N802
        async def work():
            answer = self._describe(request, oip_model.model_config)
            config = model_config_pb2.ModelConfig()
            json_format.ParseDict(answer, config, ignore_unknown_fields=True)
            return pb.ModelConfigResponse(config=config)

        return await self._answer(context, "grpc_model_config", work, counted=False)

    def _describe(self, request, describe) -> dict:
        """``describe(worker, version)`` of the version a metadata or config call names."""
        _readable(request)
        with oip_model.lease_named(self.worker, request.name, request.version) as served:
            return describe(self.worker, served)

    async def ModelInfer(self, request, context):  # noqa: N802
        async def work():
            _readable(request)
            worker = self.worker
            with oip_model.lease_named(worker, request.model_name, request.model_version) as served:
                header, binary = request_header(request)
                sent = dict(context.invocation_metadata() or ()).get(REQUEST_ID_HEADER.lower())
                rid = request_id(None, request.id or sent)
                await context.send_initial_metadata(((REQUEST_ID_HEADER.lower(), rid),))
                probabilities, outputs = await oip_model.infer(worker, served, header, binary, rid)
                return infer_response(served.runtime, request.id, outputs, probabilities)

        return await self._answer(context, "grpc_infer", work)

    async def _answer(self, context, endpoint: str, work, *, counted: bool = True):
        """``work()``'s answer within the request timeout, counted by endpoint as HTTP's
        are (with the HTTP status it stands for), or the gRPC status of its error."""
        worker, started = self.worker, time.perf_counter()
        if counted:
            self.lifecycle.started()  # a drain waits for it
        try:
            async with asyncio.timeout(worker.limits.timeout_s):  # no task per call
                answer = await work()
        except TimeoutError:
            status, reason, message = (
                504,
                "timeout",
                f"no answer within {worker.limits.timeout_s} s",
            )
        except ImgclfError as error:
            status, reason, message = error.status_code, error.reason, error.message
            log.info("%s rejected (%s): %s", endpoint, reason, message[:300])
        except asyncio.CancelledError:  # the client went away, or its deadline passed
            count_request(worker, endpoint, started, 499, "cancelled")
            raise
        except Exception:
            log.exception("%s failed", endpoint)
            status, reason, message = 500, "internal", INTERNAL_ERROR
        else:
            count_request(worker, endpoint, started, 200)
            return answer
        finally:
            if counted:
                self.lifecycle.finished()
        count_request(worker, endpoint, started, status, reason)
        code = STATUS_CODES.get(status, grpc.StatusCode.INTERNAL)
        if code is grpc.StatusCode.INTERNAL and status < 500:
            code = grpc.StatusCode.INVALID_ARGUMENT  # a caller's mistake, whatever its kind
        await context.abort(code, message)


def _readable(request) -> None:
    if isinstance(request, Unreadable):
        raise ImgclfError(f"the request is not a message of this call: {request.error}")


class GrpcServer:
    """One worker's gRPC server on ``host:port``, shared with the worker's siblings."""

    def __init__(
        self,
        worker: WorkerContext,
        lifecycle: Lifecycle,
        *,
        host: str,
        port: int,
        max_message_bytes: int,
        max_concurrent_calls: int | None = None,
    ) -> None:
        self.address = f"{host}:{port}"
        self.server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1),
                # Phone photos are 1-5 MB and gRPC refuses more than 4 MiB by default.
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
            maximum_concurrent_rpcs=max_concurrent_calls,
        )
        self.server.add_generic_rpc_handlers(
            (service_handler(InferenceService(worker, lifecycle)),)
        )
        # gRPC's own health service (Kubernetes' grpc probes, grpc-health-probe), following
        # /readyz: SERVING once warmed, NOT_SERVING while warming and from SIGTERM on.
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.lifecycle = lifecycle
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        if not self.server.add_insecure_port(self.address):
            raise OSError(f"gRPC cannot listen on {self.address}")
        await self.server.start()
        self.loop = asyncio.get_running_loop()
        await self._health(self.lifecycle.ready)
        self.lifecycle.on_ready(self._health_threadsafe)
        log.info("Open Inference Protocol over gRPC on %s", self.address)

    async def _health(self, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else NOT_SERVING
        for service in ("", SERVICE):  # the server's, and the protocol's
            await self.health.set(service, status)

    def _health_threadsafe(self, ready: bool) -> None:
        """Readiness changes on the warm-up thread and in the SIGTERM handler."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._health(ready), loop)

    def stop_threadsafe(self, grace_s: float) -> None:
        """Stop accepting calls and finish those in flight within ``grace_s`` (from another
        thread: the drain's, or the shutdown's)."""
        loop = self.loop
        if loop is not None and not loop.is_closed():
            asyncio.run_coroutine_threadsafe(self.server.stop(grace_s), loop)


async def start_grpc_server(
    worker: WorkerContext, lifecycle: Lifecycle, settings: ServingSettings
) -> GrpcServer:
    """This worker's gRPC server on ``IMGCLF_GRPC_HOST:IMGCLF_GRPC_PORT``, within the
    server's limits, started, and stopped when the drain window ends."""
    server = GrpcServer(
        worker,
        lifecycle,
        host=settings.grpc_host,
        port=settings.grpc_port,
        max_message_bytes=settings.max_request_bytes,
        max_concurrent_calls=settings.max_concurrency,
    )
    await server.start()
    lifecycle.listeners.append(server.stop_threadsafe)
    return server
