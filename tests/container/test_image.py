"""The CPU image as a deployer runs it: ready in time, right on real digits over ``/predict``
and the Open Inference Protocol (HTTP and gRPC), metrics, a non-root user on a read-only
root filesystem, its settings honoured, a killed worker replaced, 20 clean starts, and an
idle keep-alive connection kept longer than the balancers in front of it keep theirs."""

from __future__ import annotations

import os
import random
import signal
import socket
import time

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton

from serving.core.runtime import ClassifierRuntime
from serving.web.settings import ServingSettings
from tests.container.conftest import READY_WITHIN_S, Container, metric, podman, readiness
from tests.serving.web.test_drain import ask_on
from training.datasets import read_manifest

pytestmark = pytest.mark.container

#: The settings a deployer passes; each is checked in an answer.
SETTINGS = {"IMGCLF_WORKERS": "2", "IMGCLF_DEFAULT_TOP_K": "2"}
KEEP_ALIVE_S = ServingSettings.model_fields["keep_alive_timeout_s"].default


@pytest.fixture(scope="module")
def held_out(digits_run) -> list[tuple[bytes, str]]:
    """100 held-out digit scans, as the PNG files the run split off, with their labels."""
    samples = random.Random(0).sample(read_manifest(digits_run)["test"], 100)
    return [(sample.path.read_bytes(), sample.label) for sample in samples]


@pytest.fixture(scope="module")
def served(image):
    """One container for the module."""
    with Container(image, env=SETTINGS, grpc=True) as container:
        yield container, container.wait_ready(workers=2)


@pytest.fixture(scope="module")
def idle_connection(served):
    """A keep-alive connection to ``served``, asked once and then left idle; opened by the
    first test that asks for it (after the worker kill, which would close it), checked by
    the last one."""
    container, _ = served
    with socket.create_connection(("127.0.0.1", container.port), timeout=10) as connection:
        assert ask_on(connection).startswith(b"HTTP/1.1 200")
        yield connection, time.monotonic()


def test_ready_within_the_stated_time_with_every_worker(served):
    container, ready_s = served
    assert ready_s < READY_WITHIN_S
    assert readiness(container.url) == {"status": "ready", "workers": {"ready": 2, "of": 2}}


def test_predicts_held_out_digits_as_the_model_does_offline(served, held_out, digits_model):
    container, _ = served
    offline = ClassifierRuntime(digits_model, provider="cpu")
    with httpx.Client(base_url=container.url, timeout=30) as client:
        answers = [
            client.post("/predict", content=data, headers={"Content-Type": "image/png"})
            for data, _ in held_out
        ]
    assert {answer.status_code for answer in answers} == {200}
    served_labels = [answer.json()["label"] for answer in answers]
    images = np.stack([offline.preprocess(data) for data, _ in held_out])
    expected = [offline.classes[i] for i in offline.predict(images).argmax(axis=1)]
    assert served_labels == expected
    truths = [truth for _, truth in held_out]
    accuracy = np.mean([label == truth for label, truth in zip(served_labels, truths, strict=True)])
    assert accuracy >= 0.9, accuracy
    assert all(len(answer.json()["top_k"]) == 2 for answer in answers)  # IMGCLF_DEFAULT_TOP_K


@pytest.mark.parametrize("client_module", [triton, triton_grpc], ids=["http", "grpc"])
def test_the_open_inference_protocol_with_the_triton_client(served, held_out, client_module):
    """Over HTTP, and over gRPC on the port the image's IMGCLF_GRPC_PORT opens (each test
    container is given one of its own on the host's network)."""
    container, _ = served
    triton = client_module
    address = container.url.removeprefix("http://")
    if client_module is triton_grpc:
        address = f"127.0.0.1:{container.grpc_port}"
    client = triton.InferenceServerClient(address)
    try:
        assert client.is_server_ready() and client.is_model_ready("digits")
        tensor = triton.InferInput("image", [4, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[d] for d, _ in held_out[:4]], dtype=np.object_))
        result = client.infer("digits", [tensor])
        labels = [str(i) for i in result.as_numpy("probabilities").argmax(axis=1)]
    finally:
        client.close()
    with httpx.Client(base_url=container.url, timeout=30) as http:
        direct = [
            http.post("/predict", content=d, headers={"Content-Type": "image/png"}).json()["label"]
            for d, _ in held_out[:4]
        ]
    assert labels == direct


def test_metrics_are_exported(served):
    container, _ = served
    assert metric(container.url, "imgclf_requests_total") >= 104  # written at once
    deadline = time.monotonic() + 5  # the per-class counts: each worker's, within a second
    while metric(container.url, "imgclf_predictions_total") < 108:
        assert time.monotonic() < deadline, metric(container.url, "imgclf_predictions_total")
        time.sleep(0.2)
    assert metric(container.url, "imgclf_workers") == 2
    assert metric(container.url, "imgclf_workers_ready") == 2
    assert metric(container.url, "imgclf_ready") == 1


def test_runs_as_a_user_of_its_own_on_a_read_only_root(served):
    container, _ = served
    users = {user for user, _ in container.top("user", "pid")}
    assert users == {"bentoml"}, users
    refused = podman("exec", container.name, "touch", "/home/bentoml/x", check=False)
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr
    assert podman("exec", container.name, "touch", "/tmp/x", check=False).returncode == 0


def test_the_settings_reach_every_worker(served):
    container, _ = served
    described = httpx.get(container.url + "/metadata", timeout=10).json()
    assert described["workers"] == 2 and described["worker"]["of"] == 2
    assert described["limits"]["default_top_k"] == 2


def test_a_killed_worker_is_replaced(served):
    """BentoML leaves a dead worker dead inside a container (it expects the orchestrator to
    restart the container, which never happens while the main process lives on); the
    service makes its server replace it, as outside containers."""
    container, _ = served
    before = container.workers()
    assert len(before) == 2
    victim = before[0]
    os.kill(victim, signal.SIGKILL)  # its host pid: the tests run as root, as podman does
    seen = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready = readiness(container.url)["workers"]["ready"]
        seen.add(ready)
        if ready == 2 and victim not in container.workers():
            break
        time.sleep(0.1)
    after = container.workers()
    assert len(after) == 2 and victim not in after, (before, after)
    assert 1 in seen, f"/readyz never said a worker was missing: {seen}"
    assert metric(container.url, "imgclf_worker_deaths_total") == 1
    assert "ended without shutting down" in container.logs()


def test_twenty_starts_bring_up_every_worker(image, idle_connection):
    """Both workers of a server open the feedback store at the same moment: before it was
    opened under a lock, a worker died with "database is locked" in 1 of 4 to 1 of 28
    starts, and was not replaced. Two containers start at once, ten times. (Meanwhile the
    idle connection waits for the last test.)"""
    logs = []
    for _ in range(10):
        pair = [Container(image, env={"IMGCLF_DRAIN_WINDOW_S": "0"}) for _ in range(2)]
        try:
            for container in pair:
                container.wait_ready(workers=2, timeout=90)
                logs.append(container.logs())
        finally:
            for container in pair:
                container.remove()
    assert len(logs) == 20
    failed = [log[-2000:] for log in logs if "database is locked" in log or "Traceback" in log]
    assert failed == []


def test_an_idle_keep_alive_connection_outlives_the_balancers_idle_timeout(idle_connection):
    """The idle connection still answers once the documented timeout has almost passed:
    above AWS ALB's and nginx's 60 s."""
    idle, opened = idle_connection
    assert KEEP_ALIVE_S >= 65
    time.sleep(max(0.0, opened + KEEP_ALIVE_S - 2 - time.monotonic()))
    assert ask_on(idle).startswith(b"HTTP/1.1 200")
