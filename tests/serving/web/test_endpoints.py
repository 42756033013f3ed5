"""Every endpoint, in-process and against a real ``bentoml serve`` process, with real files."""

from __future__ import annotations

import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from serving import __version__
from tests.serving.cases import bad_requests, good_images, send

GOOD = good_images()
BAD = bad_requests()


@pytest.fixture(params=["in_process", "real_server"])
def api(request):
    """The same checks against both ways of running the service."""
    return request.getfixturevalue("client" if request.param == "in_process" else "http")


@pytest.mark.parametrize("name", list(GOOD))
def test_predict_raw_body_matches_the_runtime(api, reference, name):
    data, content_type, _ = GOOD[name]
    response = api.post("/predict", content=data, headers={"Content-Type": content_type})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"label", "score", "top_k", "model_version", "request_id"}
    assert body["request_id"] == response.headers["X-Request-ID"]
    expected = reference.predict(reference.preprocess(data)[None])[0]
    assert body["label"] == reference.classes[int(expected.argmax())]
    assert body["score"] == pytest.approx(float(expected.max()), rel=1e-5)
    assert body["model_version"] == 1
    assert len(body["top_k"]) == 3  # the servers' IMGCLF_DEFAULT_TOP_K
    assert body["top_k"][0] == {"label": body["label"], "score": body["score"]}
    scores = [entry["score"] for entry in body["top_k"]]
    assert scores == sorted(scores, reverse=True)


def test_request_ids_name_each_prediction(api):
    """The caller's own id when it is safe to store and log; a new one otherwise; each image
    of a batch gets ``id/index``."""
    data, content_type, _ = GOOD["png"]
    raw = {"Content-Type": content_type}
    mine = api.post("/predict", content=data, headers={**raw, "X-Request-ID": "order-17:a.b"})
    assert mine.json()["request_id"] == mine.headers["X-Request-ID"] == "order-17:a.b"
    generated = set()
    for unsafe in ("a/b", "x" * 129, "<script>", "-starts-with-a-dash", ""):
        answer = api.post("/predict", content=data, headers={**raw, "X-Request-ID": unsafe})
        assert answer.status_code == 200
        rid = answer.json()["request_id"]
        assert rid != unsafe and len(rid) == 32 and rid == answer.headers["X-Request-ID"]
        generated.add(rid)
    assert len(generated) == 5  # a new one every time
    # UUIDv7: time-ordered, so that the feedback store appends rather than inserts.
    parsed = [uuid.UUID(rid) for rid in sorted(generated)]
    assert {(u.version, u.variant) for u in parsed} == {(7, uuid.RFC_4122)}
    assert abs((parsed[-1].int >> 80) - time.time() * 1000) < 60_000  # milliseconds
    batch = api.post(
        "/predict_batch",
        files=[
            ("images", ("a.png", data, content_type)),
            ("images", ("b.png", data, content_type)),
        ],
        headers={"X-Request-ID": "batch-1"},
    )
    assert [item["request_id"] for item in batch.json()] == ["batch-1/0", "batch-1/1"]
    assert batch.headers["X-Request-ID"] == "batch-1"


def test_predict_multipart_with_top_k(api):
    data, content_type, _ = GOOD["png"]
    response = api.post(
        "/predict", files={"image": ("three.png", data, content_type)}, params={"top_k": "5"}
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["top_k"]) == 5
    form_field = api.post(
        "/predict", files={"image": ("three.png", data, content_type)}, data={"top_k": "2"}
    )
    assert len(form_field.json()["top_k"]) == 2


def test_image_jpg_content_type_is_accepted(api):
    data, _, _ = GOOD["jpeg"]
    response = api.post("/predict", content=data, headers={"Content-Type": "image/jpg"})
    assert response.status_code == 200


def test_predict_batch_keeps_input_order(api, reference):
    names = ["png", "jpeg", "grayscale", "rgba", "png"]
    files = [("images", (f"{n}.img", GOOD[n][0], GOOD[n][1])) for n in names]
    response = api.post("/predict_batch", files=files, params={"top_k": "1"})
    assert response.status_code == 200, response.text
    results = response.json()
    assert len(results) == len(names)
    for name, result in zip(names, results, strict=True):
        expected = reference.predict(reference.preprocess(GOOD[name][0])[None])[0]
        assert result["label"] == reference.classes[int(expected.argmax())]
        assert len(result["top_k"]) == 1
    same = [{k: v for k, v in results[i].items() if k != "request_id"} for i in (0, 4)]
    assert same[0] == same[1]  # the same image twice: the same answer, under its own id


def test_metadata(api, published_model):
    response = api.get("/metadata")
    assert response.status_code == 200
    body = response.json()
    assert (body["name"], body["version"]) == ("tiny", 1)
    assert body["classes"] == ["0", "1", "2", "3", "4"]
    assert body["input"]["height"] == 16 and body["input"]["channels"] == 3
    assert body["execution_provider"] == "CPUExecutionProvider"
    assert body["startup"]["warmed_batch_sizes"] == [1, 2, 4, 8, 16, 32, 64]
    assert body["startup"]["warm_up_seconds"] > 0 and body["startup"]["model_load_seconds"] > 0
    assert body["batching"]["buckets"] == [1, 2, 4, 8, 16, 32, 64]
    assert body["sessions"]["buckets"] == [1, 2, 4, 8, 16, 32, 64]
    assert body["state"] == "ready"
    assert body["parity"]["onnx"]["top1_agreement"] == 1.0
    assert 0 <= body["metrics"]["accuracy"] <= 1
    assert body["limits"]["max_images_per_request"] == 8


def test_metadata_reports_how_batch_shapes_map_to_sessions(client, http):
    """The in-process service runs the CPU default (one shared session); the real server is
    started with ``IMGCLF_SESSION_MODE=per-bucket`` (tests/serving/conftest.py)."""
    shared = client.get("/metadata").json()["sessions"]
    assert (shared["mode"], shared["count"]) == ("shared", 1)
    assert shared["input_shapes"] == {"all": ["batch", 16, 16, 3]}
    per_bucket = http.get("/metadata").json()["sessions"]
    assert per_bucket["mode"] == "per-bucket" and per_bucket["count"] == 7
    assert per_bucket["input_shapes"] == {
        str(size): [size, 16, 16, 3] for size in (1, 2, 4, 8, 16, 32, 64)
    }
    assert set(per_bucket["runs_by_bucket"]) == set(per_bucket["input_shapes"])  # warmed
    assert per_bucket["weights_bytes_per_session"] > 0


def test_health_and_openapi(api):
    assert api.get("/livez").status_code == 200
    assert api.get("/readyz").status_code == 200
    spec = api.get("/docs.json").json()
    for path in ("/predict", "/predict_batch", "/metadata"):
        assert path in spec["paths"], path
    assert "multipart/form-data" in spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert spec["info"]["version"] == __version__ != "None"
    assert spec["info"]["title"] == "imgclf" and "/predict" in spec["info"]["description"]


@pytest.mark.parametrize("case", BAD, ids=[c.name for c in BAD])
def test_bad_input_gets_its_4xx_json_error(api, case):
    response = send(api, case)
    assert response.status_code == case.status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert case.says in body["error"], body["error"]


def test_wrong_method_is_a_json_405(api):
    response = api.get("/predict")
    assert response.status_code == 405
    assert "error" in response.json()


def test_server_keeps_serving_after_every_bad_input(http):
    for case in BAD:
        assert send(http, case).status_code < 500, case.name
    data, content_type, _ = GOOD["png"]
    response = http.post("/predict", content=data, headers={"Content-Type": content_type})
    assert response.status_code == 200


def test_a_url_instead_of_a_file_is_never_fetched(http):
    hits = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(GOOD["png"][0])

        def log_message(self, *args):
            pass

    listener = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=listener.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.server_port}/digit.png"
    try:
        as_field = http.post("/predict", files={"other": ("x", b"x")}, data={"image": url})
        as_json = http.post("/predict", json={"image": url})
        as_text = http.post(
            "/predict", content=url.encode(), headers={"Content-Type": "text/plain"}
        )
    finally:
        listener.shutdown()
    assert [as_field.status_code, as_json.status_code, as_text.status_code] == [400, 415, 415]
    assert hits == []


def batch_size_totals(http) -> tuple[float, float]:
    """(images, batches) run so far, from the imgclf_batch_size histogram."""
    totals = {"sum": 0.0, "count": 0.0}
    for line in http.get("/metrics").text.splitlines():
        for kind in totals:
            if line.startswith(f"imgclf_batch_size_{kind}"):
                totals[kind] += float(line.split()[-1])
    return totals["sum"], totals["count"]


def test_concurrent_requests_are_batched_each_with_its_own_top_k(server, http):
    """The test server has one worker: concurrent requests to it share ONNX Runtime batches,
    and each still gets the top_k it asked for."""
    from concurrent.futures import ThreadPoolExecutor

    data, content_type, _ = GOOD["png"]
    images_before, batches_before = batch_size_totals(http)

    def one(index):
        top_k = index % 5 + 1
        response = http.post(
            "/predict",
            content=data,
            headers={"Content-Type": content_type},
            params={"top_k": str(top_k)},
        )
        return top_k, response

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(one, range(96)))
    assert [r.status_code for _, r in answers] == [200] * 96
    assert [len(r.json()["top_k"]) for _, r in answers] == [k for k, _ in answers]
    assert len({r.json()["label"] for _, r in answers}) == 1
    images_after, batches_after = batch_size_totals(http)
    images, batches = images_after - images_before, batches_after - batches_before
    assert images == 96
    assert batches < images, f"{images:.0f} images in {batches:.0f} batches: never batched"
