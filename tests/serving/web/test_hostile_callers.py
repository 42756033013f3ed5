"""Hostile callers and dying workers, against one real one-worker server with a feedback
token: labels only with the token, an id labelled once and never taken over, a huge body of
tiny elements refused while ``/readyz`` keeps answering, an oversized header refused as it
arrives, a timed-out request counted, a killed worker logged and counted with none of its
answers lost, and workers that die with a killed main process."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from tests.serving.cases import INFER, digit, encode
from tests.serving.conftest import Server

#: Timing-sensitive (probe latency under 0.5 s, timeouts): make test runs it alone, after
#: the parallel pass.
pytestmark = pytest.mark.serial

TOKEN = "feedback-token-for-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIMEOUT_S = 3
HEADER_TIMEOUT_S = 1


@pytest.fixture(scope="module")
def guarded(published_model, tmp_path_factory):
    runtime = tmp_path_factory.mktemp("runtime")  # where the server's runtime folder goes
    with Server(
        published_model,
        env={
            # As a secret mounted from a file arrives: with a newline (stripped).
            "IMGCLF_FEEDBACK_TOKEN": TOKEN + "\n",
            "IMGCLF_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
            "IMGCLF_FEEDBACK_MIN_SAMPLES": "1",
            "IMGCLF_TIMEOUT_S": str(TIMEOUT_S),
            "IMGCLF_MAX_REQUEST_BYTES": str(80 * 1024 * 1024),
            "TMPDIR": str(runtime),
        },
        args=("--workers", "1"),
    ) as running:
        running.runtime = runtime
        yield running


@pytest.fixture(scope="module")
def api(guarded):
    with guarded.client(timeout=30) as session:
        yield session


def sample(api, name: str, **labels: str) -> float | None:
    """The sum of a metric's samples whose labels include ``labels`` (None: no sample)."""
    found = None
    for line in api.get("/metrics").text.splitlines():
        match = re.match(r"([a-z_]+)(?:\{(.*)\})? (\S+)$", line)
        if not match or match[1] != name:
            continue
        have = dict(re.findall(r'(\w+)="([^"]*)"', match[2] or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            found = (found or 0.0) + float(match[3])
    return found


def predict(api, image: bytes, rid: str) -> dict:
    response = api.post(
        "/predict", content=image, headers={"Content-Type": "image/png", "X-Request-ID": rid}
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_labels_need_the_token_and_an_id_is_labelled_once(api):
    images = [encode(digit(label, 1), "PNG") for label in (0, 1, 2)]
    answers = [predict(api, image, f"order-{i}") for i, image in enumerate(images)]
    wrong = [
        {"request_id": a["request_id"], "label": "2" if a["label"] != "2" else "1"} for a in answers
    ]
    for headers in ({}, {"Authorization": "Bearer not-the-token-at-all"}, {"Authorization": TOKEN}):
        refused = api.post("/feedback", json=wrong, headers=headers)
        assert refused.status_code == 401, refused.text
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert "IMGCLF_FEEDBACK_TOKEN" in refused.json()["error"]
        assert api.get("/feedback", headers=headers).status_code == 401
    assert sample(api, "imgclf_feedback_accuracy_ratio") is None  # nothing was counted
    assert sample(api, "imgclf_feedback_total") is None

    first = answers[0]
    accepted = api.post("/feedback", json=[wrong[0]], headers=AUTH)
    assert accepted.status_code == 200 and accepted.json()["correct"] == 0, accepted.text
    assert sample(api, "imgclf_feedback_accuracy_ratio") == 0.0
    again = api.post(
        "/feedback", json={"request_id": first["request_id"], "label": first["label"]}, headers=AUTH
    )
    assert again.status_code == 409, again.text
    predict(api, images[0], first["request_id"])  # predicted again under the labelled id
    assert (
        api.post(
            "/feedback",
            json={"request_id": first["request_id"], "label": first["label"]},
            headers=AUTH,
        ).status_code
        == 409
    )
    report = api.get("/feedback", headers=AUTH)
    assert report.status_code == 200 and report.json()["labelled"] == 1


def test_a_caller_cannot_take_over_another_callers_id(api):
    victim_image, other_image = encode(digit(0, 2), "PNG"), encode(digit(1, 2), "PNG")
    taken = sample(api, "imgclf_feedback_ids_taken_total") or 0
    victim = predict(api, victim_image, "victim-17")
    other = predict(api, other_image, "victim-17")  # the same id, another image
    assert other["label"] != victim["label"], "the two images must be told apart"
    time.sleep(0.5)  # the feedback store is written a quarter second after the answers
    label = api.post(
        "/feedback", json={"request_id": "victim-17", "label": victim["label"]}, headers=AUTH
    )
    assert label.status_code == 200 and label.json()["correct"] == 1, label.text
    assert sample(api, "imgclf_feedback_ids_taken_total") == taken + 1


def test_a_huge_body_of_tiny_elements_is_refused_while_readyz_answers(api, guarded):
    body = (
        b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ['
        + b",".join([b'"a"'] * (64 * 1024 * 1024 // 4))
        + b"]}]}"
    )
    probes, done = [], threading.Event()

    def probe():
        with guarded.client(timeout=10) as prober:
            while not done.is_set():
                started = time.perf_counter()
                assert prober.get("/readyz").status_code == 200
                probes.append(time.perf_counter() - started)
                time.sleep(0.01)

    def refuse() -> tuple[bytes, float, float]:
        """Upload the body on a raw socket: the answer, the upload's time, and the time from
        the last byte handed over to the answer."""
        with socket.create_connection(("127.0.0.1", guarded.port), timeout=30) as connection:
            started = time.perf_counter()
            connection.sendall(
                f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            sent = time.perf_counter()
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
        return answer, sent - started, time.perf_counter() - sent

    thread = threading.Thread(target=probe)
    thread.start()
    try:
        time.sleep(0.1)
        refused = [refuse() for _ in range(3)]
    finally:
        done.set()
        thread.join()
    for answer, upload, after in refused:
        assert answer.split()[1] == b"413", answer[:300]
        assert b"more values than 8 images" in answer
        assert after < 0.5, f"answered {after:.2f} s after the upload ({upload:.2f} s)"
    assert len(probes) > 5 and max(probes) < 0.5, max(probes)


def head_status(port: int, head: bytes) -> tuple[int, float]:
    """Send a request head on a raw socket; the status of the answer and its time."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        # The server may answer and close before it has read it all.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            connection.sendall(head)
        answer = connection.recv(1024)
    return int(answer.split()[1]), time.perf_counter() - started


def test_an_oversized_header_gets_431_as_it_arrives(guarded):
    big = b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1024 * 1024) + b"\r\n\r\n"
    status, seconds = head_status(guarded.port, big)
    assert status == 431 and seconds < 1.0, (status, seconds)
    fits = b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Fits: " + b"a" * (32 * 1024) + b"\r\n\r\n"
    assert head_status(guarded.port, fits)[0] == 200


def test_an_oversized_header_in_one_write_gets_431(guarded):
    """The whole head in one write, ended and followed by nothing: the bound holds on the
    bytes received (a 70 KB head passed the 64 KiB limit when the check followed the
    parse)."""
    head = b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n"
    assert head_status(guarded.port, head)[0] == 431


def test_a_head_that_never_arrives_is_cut_off(guarded):
    """A connection that sends nothing is closed, one whose head trickles in gets 408,
    after the header timeout (1 s here; 30 s by default), instead of holding a socket
    forever."""
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as silent:
        started = time.perf_counter()
        assert silent.recv(1024) == b""
        assert time.perf_counter() - started < HEADER_TIMEOUT_S + 2
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=10) as trickle:
        trickle.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n")
        answer = trickle.recv(1024)
        assert answer.split()[1] == b"408" and b"took more than 1 s" in answer, answer


def test_a_timed_out_request_is_counted_as_504(api, guarded):
    with socket.create_connection(("127.0.0.1", guarded.port), timeout=TIMEOUT_S + 10) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 1000\r\n\r\n" + b"\x89PNG" * 4  # and then nothing
        )
        assert int(sock.recv(1024).split()[1]) == 504
    assert sample(api, "imgclf_requests_total", endpoint="predict", code="504") == 1
    assert sample(api, "imgclf_request_errors_total", endpoint="predict", reason="timeout") == 1


def test_a_killed_worker_is_logged_counted_and_its_answers_kept(api, guarded):
    image = encode(digit(2, 3), "PNG")
    victim = api.get("/metadata").json()["worker"]["pid"]
    counted_before = sample(api, "imgclf_requests_total", endpoint="predict") or 0
    stop, statuses = threading.Event(), []

    def load():
        with guarded.client(timeout=30) as caller:
            while not stop.is_set():
                try:
                    answer = caller.post(
                        "/predict", content=image, headers={"Content-Type": "image/png"}
                    )
                except httpx.TransportError:
                    statuses.append(0)  # cut off by the kill
                    continue
                # The replacement's "the service is starting" comes before it counts.
                starting = answer.status_code == 503 and "starting" in answer.text
                statuses.append(-1 if starting else answer.status_code)

    with ThreadPoolExecutor(8) as pool:
        for _ in range(8):
            pool.submit(load)
        time.sleep(3)
        os.kill(victim, signal.SIGKILL)
        guarded.wait_ready(60)
        time.sleep(2)
        stop.set()
    replacement = api.get("/metadata").json()["worker"]["pid"]
    assert replacement != victim
    assert statuses.count(200) > 500, statuses.count(200)
    assert f"worker pid {victim} ended without shutting down" in guarded.output()
    assert sample(api, "imgclf_worker_deaths_total") == 1
    # Every answer is counted before it is sent, and the count is written at once: the
    # count holds every answer the callers got, and at most the 8 in flight at the kill more.
    ours = sample(api, "imgclf_requests_total", endpoint="predict") - counted_before
    answered = sum(1 for status in statuses if status > 0)
    assert answered <= ours <= answered + 8, (ours, answered)
    assert not list(guarded.runtime.glob(f"imgclf-server-*/gauge_*_{victim}.db"))
    assert list(guarded.runtime.glob(f"imgclf-server-*/gauge_*_{replacement}.db"))


def test_the_workers_die_with_a_killed_main_process(guarded):
    workers = psutil.Process(guarded.process.pid).children(recursive=True)
    assert workers
    guarded.process.send_signal(signal.SIGKILL)
    _, alive = psutil.wait_procs(workers, timeout=20)
    assert not alive, [p.cmdline() for p in alive]
