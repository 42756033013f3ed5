"""The Open Inference Protocol's answers about the served model, whichever transport asks
(HTTP: ``serving.web.oip``; gRPC: ``serving.web.oip_grpc``): server and model metadata,
Triton's model configuration, readiness, the version a model name and version lease, and
inference from a request already read into the protocol's header and binary data, on the
same stages as ``/predict`` (``serving.web.context.classify``)."""

from __future__ import annotations

import numpy as np

from serving import __version__
from serving.core.errors import ImgclfError, NotFoundError
from serving.core.model_dir import INPUT_NAME, OUTPUT_NAME
from serving.web.context import WorkerContext, classify
from serving.web.oip_tensors import input_images, quoted, requested_outputs
from serving.web.served import Lease, ServedVersion

EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration"]


def server_metadata() -> dict:
    return {"name": "imgclf", "version": __version__, "extensions": EXTENSIONS}


def check_ready(worker: WorkerContext) -> dict:
    """``{"ready": True}``, or a 503 error while the worker loads, warms up or drains."""
    if not worker.is_ready():
        raise ImgclfError("not ready (loading, warming up or draining)", reason="not_ready")
    return {"ready": True}


def model_metadata(worker: WorkerContext, served: ServedVersion) -> dict:
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
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, len(runtime.classes)]}],
        "parameters": {
            "input_datatypes": ["FP32", "UINT8", "BYTES"],
            "bytes_input": "encoded images, shape [-1, 1]: decoded as /predict decodes them",
        },
    }


def model_config(worker: WorkerContext, served: ServedVersion) -> dict:
    """Triton's model configuration, enough for ``image_client.py`` and ``perf_analyzer``."""
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


async def infer(
    worker: WorkerContext, served: ServedVersion, header: dict, binary: bytes, rid: str
) -> tuple[np.ndarray, list[tuple[bool, int]]]:
    """Inference on ``served`` for a request read into its inference header and binary data:
    the probabilities and the outputs asked for (``requested_outputs``)."""
    runtime = served.runtime
    outputs = requested_outputs(header, len(runtime.classes))
    images, blobs = await input_images(worker, runtime, header, binary)
    probabilities, _ = await classify(worker, served, images, blobs, rid)
    return probabilities, outputs


def lease_named(worker: WorkerContext, name: str, version: str | None) -> Lease:
    """The version a request names (``/v2/models/{name}[/versions/{version}]``, or a gRPC
    request's model name and version), leased for the request: the live one without a
    version, else any loaded one (live or shadow)."""
    runtime = worker.live_runtime
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
