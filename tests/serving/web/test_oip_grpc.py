"""The Open Inference Protocol over gRPC, with the real Triton client (``tritonclient.grpc``)
against a real ``imgclf serve --grpc-port``: the checks of ``test_oip.py`` over gRPC, 20+
malformed requests each answered with a status that is not INTERNAL, and gRPC and HTTP load
together on one worker, batched together."""

from __future__ import annotations

import asyncio
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from monitoring.metrics import ENDPOINTS
from serving.oip_proto import grpc_service_pb2 as pb
from tests.model_cache import cached
from tests.serving.cases import good_images
from tests.serving.conftest import Server, free_late_port
from tests.serving.core.test_preprocessing import png_bomb
from tests.serving.web import test_oip as oip_http
from tests.serving.web.test_endpoints import batch_size_totals

pytestmark = pytest.mark.slow

GOOD = good_images()
MODEL = "tiny"


@pytest.fixture(scope="module")
def grpc_server(published_model):
    """One worker, so that gRPC and HTTP requests meet in its batches."""
    port = free_late_port()
    with Server(
        published_model, env={"IMGCLF_GRPC_PORT": str(port)}, args=("--workers", "1")
    ) as running:
        running.grpc_address = f"127.0.0.1:{port}"
        yield running


@pytest.fixture(scope="module")
def client(grpc_server):
    connection = triton.InferenceServerClient(grpc_server.grpc_address)
    yield connection
    connection.close()


@pytest.fixture(scope="module")
def stub(grpc_server):
    """The service's own stub, for requests no client library would send."""
    with grpc.insecure_channel(
        grpc_server.grpc_address, options=[("grpc.max_send_message_length", 64 * 2**20)]
    ) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel), channel


#: KServe's client pins (kserve-client.txt) conflict with this project's: its own environment.
KSERVE_REQUIREMENTS = Path(__file__).with_name("kserve-client.txt")


@pytest.fixture(scope="session")
def kserve_python() -> Path:
    """A Python with KServe's client, built with uv once and kept in the test cache."""

    def build(folder: Path) -> None:
        uv = Path(sys.executable).with_name("uv")
        subprocess.run([uv, "venv", "-q", folder / "venv", "--python", sys.executable], check=True)
        python = folder / "venv" / "bin" / "python"
        subprocess.run(
            [uv, "pip", "install", "-q", "--python", python, "-r", KSERVE_REQUIREMENTS], check=True
        )

    folder = cached("kserve-client", {"requirements": KSERVE_REQUIREMENTS.read_text()}, build)
    return folder / "venv" / "bin" / "python"


def encoded(*names: str) -> triton.InferInput:
    return oip_http.encoded(*names, client=triton)


def pixels(images: np.ndarray, datatype: str = "FP32") -> triton.InferInput:
    tensor = triton.InferInput("image", list(images.shape), datatype)
    tensor.set_data_from_numpy(images)
    return tensor


def test_health_and_readiness(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, "1")
    for name, version in (("unknown", ""), (MODEL, "2")):
        with pytest.raises(InferenceServerException) as unknown:
            client.is_model_ready(name, version)
        assert unknown.value.status() == "StatusCode.NOT_FOUND"


def test_server_and_model_metadata(client):
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "imgclf"
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])
    model = client.get_model_metadata(MODEL, as_json=True)
    assert model["name"] == MODEL and model["versions"] == ["1"]
    assert model["inputs"] == [
        {"name": "image", "datatype": "FP32", "shape": ["-1", "16", "16", "3"]}
    ]
    assert model["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": ["-1", "5"]}]
    assert client.get_model_metadata(MODEL, "1", as_json=True) == model
    with pytest.raises(InferenceServerException, match="unknown model 'nope'") as unknown:
        client.get_model_metadata("nope")
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException, match="unknown version '7'"):
        client.get_model_metadata(MODEL, "7")


def test_triton_model_configuration(client):
    config = client.get_model_config(MODEL).config
    assert config.name == MODEL and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8  # the test servers' IMGCLF_MAX_IMAGES_PER_REQUEST
    (given,) = config.input
    assert (given.name, list(given.dims)) == ("image", [16, 16, 3])
    assert given.data_type == triton.model_config_pb2.TYPE_FP32
    assert given.format == triton.model_config_pb2.ModelInput.FORMAT_NHWC
    assert list(config.output[0].dims) == [5]
    assert list(config.dynamic_batching.preferred_batch_size) == [1, 2, 4, 8, 16, 32, 64]


def test_fp32_batch_of_8_equals_the_runtime(client, reference):
    images = np.stack([reference.preprocess(GOOD[n][0]) for n in list(GOOD) * 2][:8])
    result = client.infer(MODEL, [pixels(images)])
    response = result.get_response()
    assert response.model_name == MODEL and response.model_version == "1"
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), reference.predict(images), rtol=1e-5, atol=1e-6
    )


def test_uint8_tensor_and_a_batch_of_encoded_images(client, reference):
    images = np.stack([reference.preprocess(GOOD[n][0]) for n in ("png", "grayscale")])
    result = client.infer(MODEL, [pixels(images.astype(np.uint8), "UINT8")])
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), reference.predict(images), rtol=1e-5, atol=1e-6
    )
    batch = client.infer(MODEL, [encoded("png", "jpeg", "rgba")]).as_numpy("probabilities")
    assert batch.shape == (3, 5)


def test_typed_contents_answer_as_raw_contents_do(stub, reference):
    """What a client that fills the typed fields sends (KServe's ``InferInput`` can)."""
    service, _ = stub
    images = np.stack([reference.preprocess(GOOD["png"][0])])
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="image", datatype="FP32", shape=list(images.shape))
    request.inputs[0].contents.fp32_contents.extend(images.reshape(-1).tolist())
    answer = service.ModelInfer(request)
    probabilities = np.frombuffer(answer.raw_output_contents[0], dtype="<f4").reshape(1, 5)
    np.testing.assert_allclose(probabilities, reference.predict(images), rtol=1e-5, atol=1e-6)
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="image", datatype="BYTES", shape=[1, 1])
    request.inputs[0].contents.bytes_contents.append(GOOD["png"][0])
    again = service.ModelInfer(request)
    assert again.raw_output_contents[0] == answer.raw_output_contents[0]


def test_bytes_jpeg_equals_predict_and_classification_gives_labels(client, grpc_server):
    with grpc_server.client() as http:
        oip_http.assert_jpeg_answered_as_predict(client, triton, http)


def test_request_ids_name_predictions_for_feedback_and_a_version_can_be_named(
    client, grpc_server, reference
):
    result = client.infer(MODEL, [encoded("png", "jpeg")], model_version="1", request_id="g-7")
    assert result.get_response().id == "g-7"
    labels = [reference.classes[int(i)] for i in result.as_numpy("probabilities").argmax(axis=1)]
    sent = [{"request_id": f"g-7/{i}", "label": label} for i, label in enumerate(labels)]
    with grpc_server.client() as http:
        answer = http.post("/feedback", json=sent)
    assert answer.status_code == 200, answer.text
    assert answer.json()["accepted"] == 2


def test_unknown_model_and_version_are_not_found(client):
    for name, version in (("other", ""), (MODEL, "2"), (MODEL, "x")):
        with pytest.raises(InferenceServerException) as unknown:
            client.infer(name, [encoded("png")], model_version=version)
        assert unknown.value.status() == "StatusCode.NOT_FOUND", unknown.value


def infer_request(datatype="BYTES", shape=(1, 1), raw=None, name="image", **fields):
    request = pb.ModelInferRequest(model_name=MODEL, **fields)
    request.inputs.add(name=name, datatype=datatype, shape=list(shape))
    if raw is not None:
        request.raw_input_contents.append(raw)
    return request


def serialized(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def _with_output(name: str, **parameters) -> pb.ModelInferRequest:
    request = infer_request(raw=serialized(GOOD["png"][0]))
    output = request.outputs.add(name=name)
    for key, value in parameters.items():
        setattr(output.parameters[key], value[0], value[1])
    return request


def _typed(datatype: str, field: str, values) -> pb.ModelInferRequest:
    request = infer_request(datatype, (1, 16, 16, 3))
    getattr(request.inputs[0].contents, field).extend(values)
    return request


FP32_IMAGE = np.zeros((1, 16, 16, 3), "<f4")
INVALID = grpc.StatusCode.INVALID_ARGUMENT
#: name -> (request, or bytes that are no request, expected status, what the message says)
MALFORMED = {
    "no input": (pb.ModelInferRequest(model_name=MODEL), INVALID, "exactly one input"),
    "two inputs": (
        pb.ModelInferRequest(
            model_name=MODEL,
            inputs=[pb.ModelInferRequest.InferInputTensor(name="image")] * 2,
        ),
        INVALID,
        "exactly one input",
    ),
    "unknown input": (infer_request(name="pixels", raw=b""), INVALID, "unknown input"),
    "wrong datatype": (infer_request("INT32", (1, 16, 16, 3), b"\0" * 3072), INVALID, "datatype"),
    "wrong shape": (infer_request("FP32", (1, 4, 4, 3), b"\0" * 192), INVALID, "must have shape"),
    "size mismatch": (infer_request("FP32", (1, 16, 16, 3), b"\0" * 10), INVALID, "do not fill"),
    "empty batch": (infer_request(shape=(0, 1), raw=b""), INVALID, "batch dimension"),
    "batch over the limit": (
        infer_request(shape=(9, 1), raw=serialized(*[GOOD["png"][0]] * 9)),
        INVALID,
        "batch dimension",
    ),
    "negative dimension": (infer_request(shape=(-1, 1), raw=b""), INVALID, "non-negative"),
    "bytes of rank 3": (infer_request(shape=(1, 1, 1), raw=b""), INVALID, "[N, 1]"),
    "garbage image": (infer_request(raw=serialized(b"garbage")), INVALID, "not an image"),
    "decompression bomb": (
        infer_request(raw=serialized(png_bomb(60_000, 60_000))),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "pixels",
    ),
    "truncated length prefix": (infer_request(raw=b"\x05\x00"), INVALID, "length prefix"),
    "element past the data": (infer_request(raw=b"\xff\0\0\0abc"), INVALID, "longer than"),
    "more elements than the shape": (
        infer_request(raw=serialized(b"a", b"b")),
        INVALID,
        "more than 1 BYTES",
    ),
    "raw contents per input": (
        infer_request(raw=serialized(b"a"), raw_input_contents=[b"", b""]),
        INVALID,
        "one entry per input",
    ),
    "uint8 over 255": (_typed("UINT8", "uint_contents", [300] * 768), INVALID, "0 to 255"),
    "not a number": (
        infer_request("FP32", (1, 16, 16, 3), np.full((1, 16, 16, 3), np.nan, "<f4").tobytes()),
        INVALID,
        "NaN",
    ),
    "unknown output": (_with_output("logits"), INVALID, "unknown output"),
    "classification as text": (
        _with_output("probabilities", classification=("string_param", "3")),
        INVALID,
        "integer parameter",
    ),
    "negative classification": (
        _with_output("probabilities", classification=("int64_param", -1)),
        INVALID,
        "non-negative",
    ),
    "oversized message": (
        infer_request("FP32", (1, 16, 16, 3), b"\0" * (9 * 2**20)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "",
    ),
    "garbage bytes": (b"\xff\xff\xff\xff\xff", INVALID, "not a message"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_get_a_status_that_is_not_internal(stub, case):
    service, channel = stub
    request, expected, says = MALFORMED[case]
    if isinstance(request, bytes):
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        send = lambda: call(request, timeout=30)  # noqa: E731
    else:
        send = lambda: service.ModelInfer(request, timeout=30)  # noqa: E731
    with pytest.raises(grpc.RpcError) as refused:
        send()
    assert refused.value.code() == expected, refused.value.details()
    assert says in refused.value.details()
    assert refused.value.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)


def test_after_every_malformed_request_the_server_is_ready_and_answers(client, reference):
    for request, *_ in MALFORMED.values():
        if not isinstance(request, bytes):
            with pytest.raises(grpc.RpcError):
                client._client_stub.ModelInfer(request)
    assert client.is_server_ready()
    images = np.stack([reference.preprocess(GOOD["png"][0])])
    np.testing.assert_allclose(
        client.infer(MODEL, [pixels(images)]).as_numpy("probabilities"),
        reference.predict(images),
        rtol=1e-5,
        atol=1e-6,
    )


def test_calls_outside_the_protocol_answer_unimplemented(stub):
    service, _ = stub
    with pytest.raises(grpc.RpcError) as refused:
        service.RepositoryIndex(pb.RepositoryIndexRequest())
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


def batches_over(http: httpx.Client, size: int) -> float:
    """Batches of more than ``size`` images run so far (the imgclf_batch_size histogram)."""
    count = at_most = 0.0
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("imgclf_batch_size_count"):
            count += float(line.split()[-1])
        elif line.startswith(f'imgclf_batch_size_bucket{{le="{float(size)}"'):
            at_most += float(line.split()[-1])
    return count - at_most


def test_grpc_and_http_load_together_without_an_error_in_shared_batches(grpc_server, reference):
    """16 gRPC and 16 HTTP clients, one image a call, for 20 s on one worker: no error, and
    batches of more than 16 images, which neither protocol's 16 clients fill alone."""
    image = GOOD["png"][0]
    errors: list[str] = []
    calls = {"grpc": 0, "http": 0}

    async def run() -> None:
        deadline = time.monotonic() + 20

        async def grpc_client() -> None:
            async with triton_aio.InferenceServerClient(grpc_server.grpc_address) as aio:
                while time.monotonic() < deadline:
                    tensor = triton_aio.InferInput("image", [1, 1], "BYTES")
                    tensor.set_data_from_numpy(np.array([[image]], dtype=np.object_))
                    try:
                        await aio.infer(MODEL, [tensor])
                        calls["grpc"] += 1
                    except InferenceServerException as error:
                        errors.append(f"grpc: {error}")

        async def http_client() -> None:
            async with httpx.AsyncClient(base_url=grpc_server.url, timeout=30) as http:
                while time.monotonic() < deadline:
                    answer = await http.post(
                        "/predict", content=image, headers={"Content-Type": "image/png"}
                    )
                    if answer.status_code == 200:
                        calls["http"] += 1
                    else:
                        errors.append(f"http {answer.status_code}: {answer.text}")

        await asyncio.gather(
            *(grpc_client() for _ in range(16)), *(http_client() for _ in range(16))
        )

    with grpc_server.client() as http:
        before = batches_over(http, 16), batch_size_totals(http)
        asyncio.run(run())
        mixed = batches_over(http, 16) - before[0]
        images = batch_size_totals(http)[0] - before[1][0]
    assert errors == []
    assert calls["grpc"] > 100 and calls["http"] > 100, calls
    assert images == calls["grpc"] + calls["http"]
    assert mixed > 0, "no batch held more than 16 images: gRPC and HTTP were never batched together"
    with grpc_server.client() as http:
        endpoints = {
            line.split('endpoint="', 1)[1].split('"', 1)[0]
            for line in http.get("/metrics").text.splitlines()
            if line.startswith("imgclf_requests_total{")
        }
    assert {"grpc_infer", "predict"} <= endpoints <= set(ENDPOINTS), endpoints


def test_grpc_health_service_says_serving(grpc_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(grpc_server.grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.serial
def test_sigterm_drains_grpc_as_http(published_model):
    """Through the drain window the worker says it is not ready (ServerReady, gRPC health)
    and still answers calls; then it stops, every call answered."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = free_late_port()
    server = Server(
        published_model,
        env={"IMGCLF_GRPC_PORT": str(port), "IMGCLF_DRAIN_WINDOW_S": "3"},
        args=("--workers", "1"),
    )
    with server:
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_server_ready()
        server.signal()
        deadline = time.monotonic() + 10
        while client.is_server_ready():
            assert time.monotonic() < deadline, "still ready after SIGTERM"
            time.sleep(0.05)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        answered = 0
        while server.process.poll() is None and answered < 20:
            client.infer(MODEL, [encoded("png")])  # in the window: still answered
            answered += 1
        assert answered == 20
        assert server.process.wait(timeout=30) == 0
        client.close()


def test_kserves_grpc_client_passes_the_same_checks(
    grpc_server, kserve_python, reference, tmp_path
):
    """KServe's own ``InferenceGRPCClient`` (its environment: ``kserve_checks.py``)."""
    blobs = [GOOD[name][0] for name in ("png", "jpeg")]
    (tmp_path / "images.json").write_text(json.dumps([blob.hex() for blob in blobs]))
    batch = np.stack([reference.preprocess(blob) for blob in blobs])
    np.save(tmp_path / "pixels.npy", batch)
    script = Path(__file__).with_name("kserve_checks.py")
    run = subprocess.run(
        [
            kserve_python,
            script,
            grpc_server.grpc_address,
            MODEL,
            *(str(tmp_path / name) for name in ("images.json", "pixels.npy")),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert found["live"] and found["ready"] and found["model_ready"]
    assert found["unknown_model_ready"].startswith("NOT_FOUND")
    assert found["server"]["name"] == "imgclf" and "classification" in found["server"]["extensions"]
    assert found["model"] == {
        "name": MODEL,
        "versions": ["1"],
        "inputs": [["image", "FP32", [-1, 16, 16, 3]]],
    }
    expected = reference.predict(batch)
    for kind in ("bytes", "fp32", "uint8"):
        np.testing.assert_allclose(found[kind], expected, rtol=1e-5, atol=1e-6, err_msg=kind)
    assert found["bytes_id"] == "kserve-1"
    assert found["versioned"][0] == "1"
    np.testing.assert_allclose(found["versioned"][1], expected[:1], rtol=1e-5, atol=1e-6)
    best = reference.top_k(expected[:1], 3)[0]
    assert [entry.split(":")[2] for entry in found["classified"]] == [b["label"] for b in best]
    errors = found["errors"]
    assert errors["unknown model"].startswith("NOT_FOUND"), errors
    assert errors["unknown version"].startswith("NOT_FOUND"), errors
    assert errors["bad shape"].startswith("INVALID_ARGUMENT"), errors
    assert errors["bad datatype"].startswith("INVALID_ARGUMENT"), errors
