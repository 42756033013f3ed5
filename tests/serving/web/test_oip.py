"""The Open Inference Protocol with the real Triton client against a real ``imgclf serve``:
health, metadata, Triton's model configuration, infer in every form, errors."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from tritonclient.utils import InferenceServerException

from tests.serving.cases import good_images
from tests.serving.conftest import Server
from tests.serving.web.test_endpoints import batch_size_totals
from tests.serving.web.test_hostile import CORPUS, REFUSED

GOOD = good_images()
MODEL = "tiny"


@pytest.fixture(scope="module")
def client(server):
    connection = triton.InferenceServerClient(server.url.removeprefix("http://"))
    yield connection
    connection.close()


def encoded(*names: str, client=triton):
    """The named test images as one BYTES input of ``client``'s module (HTTP or gRPC)."""
    tensor = client.InferInput("image", [len(names), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[GOOD[n][0]] for n in names], dtype=np.object_))
    return tensor


def pixels(images: np.ndarray, datatype: str = "FP32", binary: bool = True):
    tensor = triton.InferInput("image", list(images.shape), datatype)
    tensor.set_data_from_numpy(images, binary_data=binary)
    return tensor


def test_health_and_readiness(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready("unknown")
    assert not client.is_model_ready(MODEL, "2")


def test_server_and_model_metadata(client, reference):
    server = client.get_server_metadata()
    assert server["name"] == "imgclf"
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])
    model = client.get_model_metadata(MODEL)
    assert model["name"] == MODEL and model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 16, 16, 3]}]
    assert model["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 5]}]
    assert client.get_model_metadata(MODEL, "1") == model
    with pytest.raises(InferenceServerException, match="unknown model 'nope'") as unknown:
        client.get_model_metadata("nope")
    assert unknown.value.status() == "404"
    with pytest.raises(InferenceServerException, match="unknown version '7'"):
        client.get_model_metadata(MODEL, "7")


def test_triton_model_configuration(client):
    config = client.get_model_config(MODEL)
    assert config["max_batch_size"] == 8  # the test servers' IMGCLF_MAX_IMAGES_PER_REQUEST
    assert config["input"] == [
        {"name": "image", "data_type": "TYPE_FP32", "format": "FORMAT_NHWC", "dims": [16, 16, 3]}
    ]
    assert config["output"][0]["labels"] == ["0", "1", "2", "3", "4"]
    assert config["dynamic_batching"]["preferred_batch_size"] == [1, 2, 4, 8, 16, 32, 64]


def test_binary_fp32_batch_of_8_equals_the_runtime(client, reference):
    images = np.stack([reference.preprocess(GOOD[n][0]) for n in list(GOOD) * 2][:8])
    result = client.infer(MODEL, [pixels(images)])
    response = result.get_response()
    assert response["model_name"] == MODEL and response["model_version"] == "1"
    assert "binary_data_size" in response["outputs"][0]["parameters"]
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), reference.predict(images), rtol=1e-5, atol=1e-6
    )


def test_json_in_json_out_with_request_id_and_version(client, reference):
    images = np.stack([reference.preprocess(GOOD["png"][0])])
    result = client.infer(
        MODEL,
        [pixels(images, binary=False)],
        model_version="1",
        request_id="req-42",
        outputs=[triton.InferRequestedOutput("probabilities", binary_data=False)],
    )
    response = result.get_response()
    assert response["id"] == "req-42"
    assert "data" in response["outputs"][0]
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), reference.predict(images), rtol=1e-5, atol=1e-6
    )


def test_triton_request_ids_name_predictions_for_feedback(client, http, reference):
    """The request's ``id`` is the feedback id (``id/index`` for each image of a batch)."""
    result = client.infer(MODEL, [encoded("png", "jpeg")], request_id="triton-7")
    predicted = result.as_numpy("probabilities").argmax(axis=1)
    labels = [reference.classes[int(i)] for i in predicted]
    sent = [{"request_id": f"triton-7/{i}", "label": label} for i, label in enumerate(labels)]
    answer = http.post("/feedback", json=sent)
    assert answer.status_code == 200, answer.text
    assert answer.json()["accepted"] == 2 and answer.json()["correct"] == 2
    alone = client.infer(MODEL, [encoded("png")], request_id="triton-8")
    label = reference.classes[int(alone.as_numpy("probabilities").argmax())]
    assert (
        http.post("/feedback", json={"request_id": "triton-8", "label": label}).status_code == 200
    )


def test_bytes_jpeg_equals_predict_and_classification_gives_labels(client, http):
    assert_jpeg_answered_as_predict(client, triton, http)


def assert_jpeg_answered_as_predict(client, module, http) -> None:
    """A BYTES JPEG through ``client`` (of tritonclient's ``module``: HTTP or gRPC) gets
    ``/predict``'s score, and with the classification extension ``/predict``'s top 3."""
    data, content_type, _ = GOOD["jpeg"]
    predicted = http.post(
        "/predict", content=data, headers={"Content-Type": content_type}, params={"top_k": "3"}
    ).json()
    jpeg = encoded("jpeg", client=module)
    probabilities = client.infer(MODEL, [jpeg]).as_numpy("probabilities")[0]
    assert probabilities.max() == pytest.approx(predicted["score"], rel=1e-6)
    classified = client.infer(
        MODEL, [jpeg], outputs=[module.InferRequestedOutput("probabilities", class_count=3)]
    ).as_numpy("probabilities")
    assert_classified_as_predicted(classified, predicted)


def assert_classified_as_predicted(classified: np.ndarray, predicted: dict) -> None:
    """The classification extension's ``score:index:label`` strings are ``/predict``'s top 3."""
    assert classified.shape == (1, 3)
    entries = [item.decode().split(":") for item in classified[0]]
    assert [label for _, _, label in entries] == [e["label"] for e in predicted["top_k"]]
    assert [float(score) for score, _, _ in entries] == pytest.approx(
        [e["score"] for e in predicted["top_k"]], abs=1e-6
    )
    assert all(int(index) == int(label) for _, index, label in entries)  # labels are digits


def test_uint8_tensor_and_a_batch_of_encoded_images(client, reference):
    images = np.stack([reference.preprocess(GOOD[n][0]) for n in ("png", "grayscale")])
    as_uint8 = images.astype(np.uint8)  # the preprocessed pixels are whole numbers already
    result = client.infer(MODEL, [pixels(as_uint8, "UINT8")])
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), reference.predict(images), rtol=1e-5, atol=1e-6
    )
    batch = client.infer(MODEL, [encoded("png", "jpeg", "rgba")]).as_numpy("probabilities")
    assert batch.shape == (3, 5)


def test_raw_binary_form_is_one_encoded_image(http, reference):
    data = GOOD["png"][0]
    response = http.post(
        "/v2/models/tiny/infer", content=data, headers={"Inference-Header-Content-Length": "0"}
    )
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    assert output["shape"] == [1, 5]
    expected = reference.predict(reference.preprocess(data)[None])[0]
    np.testing.assert_allclose(output["data"], expected, rtol=1e-5, atol=1e-6)


def bytes_request(
    elements: list[bytes], shape: list[int], size_delta: int = 0, **extra
) -> tuple[bytes, dict]:
    """A request with a BYTES input in the binary extension: 4-byte length, then the bytes."""
    data = b"".join(struct.pack("<I", len(e)) + e for e in elements)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "BYTES",
                    "shape": shape,
                    "parameters": {"binary_data_size": len(data) + size_delta},
                }
            ],
            **extra,
        }
    ).encode()
    return header + data, {"Inference-Header-Content-Length": str(len(header))}


def truncated_element() -> tuple[bytes, dict]:
    """binary_data_size agrees with the bytes sent, but the element's own length does not."""
    body, headers = bytes_request([GOOD["png"][0]], [1, 1], size_delta=-10)
    return body[:-10], headers


MALFORMED = {
    "not json": (b"{not json", {}, 400, "not JSON"),
    "no inputs": (b"{}", {}, 400, "exactly one input"),
    "two inputs": (
        json.dumps({"inputs": [{"name": "image"}, {"name": "image"}]}).encode(),
        {},
        400,
        "exactly one input",
    ),
    "wrong input name": (
        json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES"}]}).encode(),
        {},
        400,
        "unknown input",
    ),
    "shape does not match": (
        json.dumps(
            {"inputs": [{"name": "image", "shape": [1, 8, 8, 3], "datatype": "FP32", "data": [0]}]}
        ).encode(),
        {},
        400,
        "must have shape",
    ),
    "too few values": (
        json.dumps(
            {
                "inputs": [
                    {"name": "image", "shape": [1, 16, 16, 3], "datatype": "FP32", "data": [1, 2]}
                ]
            }
        ).encode(),
        {},
        400,
        "do not fill",
    ),
    "unsupported datatype": (
        json.dumps(
            {"inputs": [{"name": "image", "shape": [1, 16, 16, 3], "datatype": "FP16", "data": []}]}
        ).encode(),
        {},
        400,
        "unsupported datatype",
    ),
    "too many images": (*bytes_request([b"x"] * 9, [9, 1]), 400, "from 1 to 8"),
    "binary size lies": (*bytes_request([GOOD["png"][0]], [1, 1], 5), 400, "binary_data_size"),
    "header length lies": (b"{}", {"Inference-Header-Content-Length": "99"}, 400, "has 2 bytes"),
    "truncated element": (*truncated_element(), 400, "longer than"),
    "not an image": (*bytes_request([b"hello"], [1, 1]), 400, "not an image"),
    "unknown output": (
        *bytes_request([GOOD["png"][0]], [1, 1], outputs=[{"name": "logits"}]),
        400,
        "unknown output",
    ),
    "bad classification": (
        *bytes_request(
            [GOOD["png"][0]],
            [1, 1],
            outputs=[{"name": "probabilities", "parameters": {"classification": "3"}}],
        ),
        400,
        "classification",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_get_their_4xx(http, case):
    body, headers, status, says = MALFORMED[case]
    response = http.post("/v2/models/tiny/infer", content=body, headers=headers)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"}
    assert says in response.json()["error"]


def test_unknown_model_and_version_are_404_and_a_url_is_never_fetched(http):
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1, 1],
                    "datatype": "BYTES",
                    "data": ["http://127.0.0.1:9/digit.png"],
                }
            ]
        }
    )
    assert http.post("/v2/models/other/infer", content=body).status_code == 404
    assert http.post("/v2/models/tiny/versions/2/infer", content=body).status_code == 404
    refused = http.post("/v2/models/tiny/infer", content=body)
    assert refused.status_code == 400 and "not an image" in refused.json()["error"]


def test_the_triton_client_refuses_with_the_servers_message(client):
    tensor = triton.InferInput("image", [1, 4, 4, 3], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 4, 4, 3), np.float32))
    with pytest.raises(InferenceServerException, match="must have shape") as refused:
        client.infer(MODEL, [tensor])
    assert refused.value.status() == "400"


@pytest.fixture(scope="module")
def waiting_server(published_model):
    """One worker whose batches wait 20 ms for more calls (``IMGCLF_BATCH_WAIT_MS``): the
    request path answers a lone call in about a millisecond, so on a machine the suite's
    other process keeps busy the client sent a round's calls more slowly than the worker
    answered them, and 16 rounds of 16 all ran alone once. A round's calls now arrive within
    one wait; calls that bypassed the batcher would still never be batched."""
    with (
        Server(published_model, env={"IMGCLF_BATCH_WAIT_MS": "20"}, args=("--workers", "1")) as up,
        up.client() as http,
    ):
        yield up, http


def test_async_infer_at_concurrency_16_is_batched(waiting_server, reference):
    """Rounds of 16 concurrent calls, at least 4, until one was batched (at most 16): on a
    machine the suite's other process keeps busy, the client can send a round's calls more
    slowly than the one worker answers them, and 4 rounds once all ran alone. Calls that
    bypassed the batcher would never be batched, however many rounds."""
    import asyncio

    server, http = waiting_server
    images = reference.preprocess(GOOD["png"][0])[None]
    before = batch_size_totals(http)

    def counted() -> tuple[float, float]:
        now = batch_size_totals(http)
        return now[0] - before[0], now[1] - before[1]

    async def run() -> list[np.ndarray]:
        async with triton_aio.InferenceServerClient(server.url.removeprefix("http://")) as aio:

            async def one(_):
                tensor = triton_aio.InferInput("image", list(images.shape), "FP32")
                tensor.set_data_from_numpy(images)
                return (await aio.infer(MODEL, [tensor])).as_numpy("probabilities")

            answers = []
            for round_ in range(16):
                answers += await asyncio.gather(*(one(i) for i in range(16)))
                images_run, batches_run = counted()
                if round_ >= 3 and batches_run < images_run:
                    break
            return answers

    answers = asyncio.run(run())
    for answer in answers:
        np.testing.assert_allclose(answer, reference.predict(images), rtol=1e-5, atol=1e-6)
    images_run, batches_run = counted()
    assert images_run == len(answers) >= 64
    assert batches_run < images_run, "the Open Inference Protocol calls were never batched"


def test_v2_routes_are_counted_by_route_template(http):
    """Our metrics label the route template, never the raw path. (BentoML's own
    bentoml_service_* metrics label the raw path of every request; see the README.)"""
    http.get("/v2/models/some-other-model")
    ours = [line for line in http.get("/metrics").text.splitlines() if line.startswith("imgclf_")]
    requests = [line for line in ours if line.startswith("imgclf_requests_total")]
    assert any('endpoint="v2_infer"' in line for line in requests)
    assert any('endpoint="v2_model_metadata"' in r and 'code="404"' in r for r in requests)
    assert not any("some-other-model" in line for line in ours)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_hostile_files_get_the_same_4xx_through_v2(http, name):
    """The committed hostile corpus, sent as the raw binary form and as a BYTES element:
    the same status and message as through /predict."""
    status, says = REFUSED[name]
    data = (CORPUS / name).read_bytes()
    for body, headers in (
        (data, {"Inference-Header-Content-Length": "0"}),
        bytes_request([data], [1, 1]),
    ):
        response = http.post("/v2/models/tiny/infer", content=body, headers=headers)
        assert response.status_code == status, (name, response.text)
        assert says in response.json()["error"]
