"""KServe's own gRPC client (``kserve.InferenceGRPCClient``) against a server: the checks of
the HTTP and Triton-client tests, run in KServe's environment (``kserve-client.txt``) by
``test_oip_grpc.py``, which compares what this prints (one JSON object) with the runtime.

    python kserve_checks.py HOST:PORT MODEL IMAGES.json PIXELS.npy
"""

from __future__ import annotations

import asyncio
import json
import sys

import grpc
import numpy as np
from kserve.inference_client import InferenceGRPCClient
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput


def encoded(*blobs: bytes) -> InferInput:
    tensor = InferInput("image", [len(blobs), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[blob] for blob in blobs], dtype=np.object_))
    return tensor


def pixels(images: np.ndarray, datatype: str) -> InferInput:
    tensor = InferInput("image", list(images.shape), datatype)
    tensor.set_data_from_numpy(images)
    return tensor


async def status_of(call) -> str:
    try:
        await call
    except grpc.RpcError as error:
        return f"{error.code().name}: {error.details()}"
    return "OK"


async def checks(address: str, model: str, images: list[bytes], pixel_batch: np.ndarray) -> dict:
    found: dict = {}
    async with InferenceGRPCClient(address, timeout=30, retries=0) as client:
        found["live"] = await client.is_server_live()
        found["ready"] = await client.is_server_ready()
        found["model_ready"] = await client.is_model_ready(model)
        found["unknown_model_ready"] = await status_of(client.is_model_ready("nope"))
        stub = client._client_stub  # the client has no metadata calls of its own
        server = await stub.ServerMetadata(pb.ServerMetadataRequest())
        found["server"] = {"name": server.name, "extensions": list(server.extensions)}
        metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name=model, version="1"))
        found["model"] = {
            "name": metadata.name,
            "versions": list(metadata.versions),
            "inputs": [[t.name, t.datatype, list(t.shape)] for t in metadata.inputs],
        }

        async def infer(inputs, **options):
            answer = await client.infer(InferRequest(model, inputs, **options))
            return answer

        answer = await infer([encoded(*images)], request_id="kserve-1")
        found["bytes"] = answer.outputs[0].as_numpy().tolist()
        found["bytes_id"] = answer.id
        found["fp32"] = (await infer([pixels(pixel_batch, "FP32")])).outputs[0].as_numpy().tolist()
        uint8 = pixels(pixel_batch.astype(np.uint8), "UINT8")
        found["uint8"] = (await infer([uint8])).outputs[0].as_numpy().tolist()
        versioned = await infer([encoded(images[0])], model_version="1")
        found["versioned"] = [versioned.model_version, versioned.outputs[0].as_numpy().tolist()]
        classified = await infer(
            [encoded(images[0])],
            request_outputs=[RequestedOutput("probabilities", {"classification": 3})],
        )
        found["classified"] = [item.decode() for item in classified.outputs[0].as_numpy()[0]]
        found["errors"] = {
            "unknown model": await status_of(
                client.infer(InferRequest("nope", [encoded(images[0])]))
            ),
            "unknown version": await status_of(
                client.infer(InferRequest(model, [encoded(images[0])], model_version="9"))
            ),
            "bad shape": await status_of(
                client.infer(InferRequest(model, [pixels(pixel_batch[:, :4, :4], "FP32")]))
            ),
            "bad datatype": await status_of(
                client.infer(InferRequest(model, [pixels(pixel_batch.astype(np.int32), "INT32")]))
            ),
        }
    return found


def main() -> None:
    address, model, images_file, pixels_file = sys.argv[1:5]
    with open(images_file) as handle:
        images = [bytes.fromhex(text) for text in json.load(handle)]
    pixel_batch = np.load(pixels_file)
    print(json.dumps(asyncio.run(checks(address, model, images, pixel_batch))))


if __name__ == "__main__":
    main()
