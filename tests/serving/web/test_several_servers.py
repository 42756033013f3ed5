"""Several servers on one host, with one BentoML home (the default): each counts exactly its
own requests and keeps its own labels, and a start that fails on a busy port touches neither.

Before each server had a runtime folder of its own, a second ``imgclf serve`` replaced the
first one's metrics, and a start that failed on a busy port emptied them for good."""

from __future__ import annotations

import re
import socket
import tempfile
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import assert_one_line_error, assert_refused_before_the_model_loads, run_cli
from tests.monitoring.test_live_monitoring import gauge, metrics_of
from tests.serving.cases import good_images
from tests.serving.conftest import Server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_servers(published_model, digits_model):
    home = {"BENTOML_HOME": tempfile.mkdtemp(prefix="imgclf-shared-home-")}
    first = Server(published_model, env=home)  # default settings: a worker per core
    second = Server(digits_model, env=home)
    try:
        first.wait_ready()
        second.wait_ready()
        yield first, second, home
    finally:
        first.stop()
        second.stop()


def predict(url: str, count: int) -> list[dict]:
    data, content_type, _ = good_images()["png"]
    answers = []
    for _ in range(count):
        response = httpx.post(
            url + "/predict", content=data, headers={"Content-Type": content_type}
        )
        assert response.status_code == 200, response.text
        answers.append(response.json())
    return answers


def requests_counted(url: str) -> float:
    """200s of /predict on ``url``'s /metrics, once every worker has flushed its buffer
    (each worker sums its counts for up to a second; the one scraped flushes at once)."""
    deadline = time.time() + 5
    while True:
        counted = gauge(metrics_of(url), "imgclf_requests_total", code="200", endpoint="predict")
        if time.time() > deadline:
            return counted
        time.sleep(1.2)
        if gauge(metrics_of(url), "imgclf_requests_total", code="200", endpoint="predict") == (
            counted
        ):
            return counted


def test_a_busy_port_is_refused_before_the_model_loads(published_model):
    """The port is checked first: its one line is all a user sees (issue 36)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = str(holder.getsockname()[1])
        failed = run_cli("serve", "--model", str(published_model), "--port", port)
    assert_refused_before_the_model_loads(failed, f"cannot listen on 127.0.0.1:{port}")
    assert failed.returncode == 1


def test_each_server_counts_its_own_requests_and_labels(two_servers):
    first, second, home = two_servers
    answers = predict(first.url, 5)
    predict(second.url, 3)
    # A third start on the first one's busy port fails in one line, before any worker runs.
    port = str(first.port)
    failed = run_cli("serve", "--model", str(first.model_dir), "--port", port, env=home)
    assert_one_line_error(failed, f"cannot listen on 127.0.0.1:{port}")
    predict(first.url, 2)
    for server, expected in ((first, 7), (second, 3)):
        assert requests_counted(server.url) == expected, server.url
    # Labels: the first server's ids are its own; the second has never seen them.
    labels = [{"request_id": a["request_id"], "label": a["label"]} for a in answers]
    assert httpx.post(first.url + "/feedback", json=labels).status_code == 200
    refused = httpx.post(second.url + "/feedback", json=labels[:1])
    assert refused.status_code == 404, refused.text
    assert httpx.get(first.url + "/feedback").json()["labelled"] == 5
    # The first request works by copy-paste: the printed curl line names a file that exists.
    printed = re.search(r"curl -F image=@(\S+) ", first.output())
    assert printed and Path(printed.group(1)).is_file(), first.output()[:2000]
    unlabelled = httpx.get(second.url + "/feedback").json()
    assert unlabelled["labelled"] == 0
    assert unlabelled["accuracy"] is None and unlabelled["macro_recall"] is None  # not 0.0


def test_metadata_says_which_worker_answered(two_servers):
    """Each worker keeps its own drift window, so /metadata names the worker whose figures
    it gives: a worker process of this server, never another's."""
    first, second, _ = two_servers
    workers = {p.pid for p in psutil.Process(first.process.pid).children(recursive=True)}
    others = {p.pid for p in psutil.Process(second.process.pid).children(recursive=True)}
    for _ in range(20):
        body = httpx.get(first.url + "/metadata").json()
        pid = body["worker"]["pid"]
        assert pid in workers and pid not in others
        assert body["worker"]["of"] == 2  # the default here: a worker per core
        assert body["monitoring"]["scope"].startswith(f"this worker (pid {pid}) of 2")
