"""A served model two ways: in-process through Starlette's TestClient, and a real
``imgclf serve`` (``bentoml serve``) process on a free port."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import IMGCLF, REPO
from tests.serving.cases import TEST_ENV


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_late_port() -> int:
    """A free port for a socket bound seconds from now (gRPC's, once the workers start):
    below the kernel's ephemeral range, where ``free_port`` and every process asking for
    port 0 meanwhile (BentoML's own control sockets) are never handed it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.Random().sample(range(20_000, min(low, 32_768)), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 90) -> list[int]:
    """Poll ``url``/readyz until 200 with every worker ready (a ready worker answers 200
    while its siblings still start: a test that then breaks something would break their
    start too); every status seen (connection refused: 0)."""
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError("server exited early")
        try:
            answer = httpx.get(url + "/readyz", timeout=2)
            status, workers = answer.status_code, answer.json().get("workers")
        except (httpx.TransportError, ValueError):
            status, workers = 0, None
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == 200 and (workers is None or workers["ready"] == workers["of"]):
            return seen
        time.sleep(0.1)  # a start takes seconds; each poll costs the client and the server CPU
    raise TimeoutError(f"server not ready after {timeout}s")


class Server:
    """A real server process; ``stop()`` sends SIGTERM like an orchestrator would."""

    def __init__(self, model_dir: Path, env: dict | None = None, args: tuple = ()) -> None:
        self.model_dir = model_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(os.environ["BENTOML_HOME"]) / f"server-{self.port}.log", "w+")  # noqa: SIM115
        self.process = subprocess.Popen(
            [IMGCLF, "serve", "--model", str(model_dir), "--port", str(self.port), *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            # Its own BentoML home: a private model store. (Metrics and feedback are per server
            # whatever the home: test_several_servers.py shares one on purpose.)
            env={**os.environ, **TEST_ENV, "BENTOML_HOME": tempfile.mkdtemp(), **(env or {})},
            cwd=REPO,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 90) -> list[int]:
        """Poll /readyz until 200; returns every status seen (connection refused: 0)."""
        try:
            return wait_ready(self.url, self.process, timeout)
        except (RuntimeError, TimeoutError) as error:
            raise type(error)(f"{error}:\n{self.output()[-3000:]}") from None

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send a signal to every process of the server, as ``docker stop`` or a pod's
        termination does to its process group."""
        os.killpg(self.process.pid, signum)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def __enter__(self) -> Server:
        self.wait_ready()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def client(self, timeout: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def stop(self) -> int:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()
        return self.process.returncode


@pytest.fixture(scope="session")
def service_module(published_model):
    """serving.service imported with settings pointing at the published test model."""
    os.environ.update(TEST_ENV)
    os.environ["IMGCLF_MODEL_DIR"] = str(published_model)
    import serving.service

    assert serving.service.SETTINGS.model_dir == published_model
    return serving.service


@pytest.fixture(scope="session")
def client(service_module):
    from starlette.testclient import TestClient

    with TestClient(service_module.ImageClassifier.to_asgi()) as test_client:
        deadline = time.time() + 60
        while test_client.get("/readyz").status_code != 200:
            assert time.time() < deadline, "the in-process service never became ready"
            time.sleep(0.02)
        yield test_client


@pytest.fixture(scope="session")
def server(published_model):
    """One worker, so that concurrent requests are batched together (the Prometheus tests
    run the default, one worker per core). It runs the CUDA default, one ONNX Runtime session
    per batch bucket, on the CPU provider: every endpoint test then checks that mode against
    the in-process service's one shared session."""
    with Server(
        published_model, env={"IMGCLF_SESSION_MODE": "per-bucket"}, args=("--workers", "1")
    ) as running:
        yield running


@pytest.fixture(scope="session")
def http(server):
    with server.client() as session:
        yield session
