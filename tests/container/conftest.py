"""The service's container image, built as a user builds it and run with podman: the base
image from Debian's packages (``container/make-base-image.sh``), the Bento and its image
(``container/build_image.py``, which is ``bentoml build`` and ``bentoml containerize``), and
containers started, probed and stopped as a deployer would.

These tests are ``make test-container`` (a step of its own in ``.ci/run``). Where podman or
debootstrap is missing they are skipped, except in CI, where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.serving.conftest import free_late_port, free_port

BASE_IMAGE = "localhost/debian-py311:bookworm"
#: podman's settings come from CONTAINERS_CONF where it is set (.ci/run points it at
#: container/containers.conf: runc, cgroupfs, ulimits under the sandbox's hard limits).
ENGINE_ENV = dict(os.environ)
#: What docs/deployment.md says a container is ready within, on a machine like CI's.
READY_WITHIN_S = 30


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, env=ENGINE_ENV, timeout=timeout
    )
    if check:
        assert result.returncode == 0, f"podman {' '.join(args)}: {result.stderr[-2000:]}"
    return result


@pytest.fixture(scope="session")
def engine() -> str:
    missing = [tool for tool in ("podman", "runc", "debootstrap") if not shutil.which(tool)]
    if missing:
        message = f"{', '.join(missing)} not installed (Debian packages; .ci/run installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return "podman"


@pytest.fixture(scope="session")
def base_image(engine) -> str:
    """The local base image, made once per machine (the script does nothing when it
    exists)."""
    result = subprocess.run(
        [str(REPO / "container" / "make-base-image.sh"), BASE_IMAGE],
        capture_output=True,
        text=True,
        env=ENGINE_ENV,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return BASE_IMAGE


@pytest.fixture(scope="session")
def image(base_image, digits_model) -> str:
    """The CPU image of the digits model, built by the documented script."""
    from serving.registry import register

    model = register(digits_model)
    tag = f"localhost/imgclf-test:{uuid.uuid4().hex[:8]}"
    result = subprocess.run(
        [
            str(REPO / ".venv" / "bin" / "python"),
            str(REPO / "container" / "build_image.py"),
            *("--base-image", base_image, "--model", model, "--tag", tag),
            *("--backend", "podman", "--network-host"),
        ],
        capture_output=True,
        text=True,
        env=ENGINE_ENV,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    yield tag
    podman("rmi", "-f", tag, check=False)


def shared_folder(prefix: str) -> Path:
    """A temporary folder the container's user (uid 1034, not root) can read: pytest's own
    are private to root."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)
    return folder


class Container:
    """One container of ``image`` on the host's network, on a port of its own: run as the
    docs run it (read-only root, a tmpfs at /tmp, BentoML's home there)."""

    def __init__(
        self,
        image: str,
        env: dict[str, str] | None = None,
        volumes: tuple[str, ...] = (),
        grpc: bool = False,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        #: The image serves gRPC on 8081; on the host's network a container that serves it
        #: needs a port of its own (bound only once its workers start: ``free_late_port``),
        #: and the others turn it off.
        self.grpc_port = free_late_port() if grpc else None
        self.name = f"imgclf-test-{uuid.uuid4().hex[:10]}"
        self.started = time.monotonic()
        arguments = ["run", "-d", "--name", self.name, "--network", "host"]
        arguments += ["--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp"]
        settings = {
            "BENTOML_HOME": "/tmp/bentoml",
            "BENTOML_PORT": str(self.port),
            "IMGCLF_GRPC_PORT": str(self.grpc_port or ""),
            **(env or {}),
        }
        for key, value in settings.items():
            arguments += ["-e", f"{key}={value}"]
        for volume in volumes:
            arguments += ["-v", volume]
        podman(*arguments, image)

    def wait_ready(self, workers: int | None = None, timeout: float = READY_WITHIN_S) -> float:
        """Seconds from ``podman run`` until ``/readyz`` is 200 (with ``workers`` ready,
        when given)."""
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            try:
                answer = httpx.get(self.url + "/readyz", timeout=2)
                if answer.status_code == 200 and (
                    workers is None or answer.json()["workers"]["ready"] == workers
                ):
                    return time.monotonic() - self.started
            except httpx.TransportError:
                pass
            if not self.running():
                break
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not ready after {timeout} s:\n{self.logs()[-3000:]}")

    def running(self) -> bool:
        state = podman("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return state.stdout.strip() == "true"

    def stop(self, grace_s: int = 40) -> int:
        """``podman stop`` (SIGTERM, then SIGKILL after ``grace_s``); the exit code."""
        podman("stop", "-t", str(grace_s), self.name, timeout=grace_s + 30)
        return int(podman("inspect", "--format", "{{.State.ExitCode}}", self.name).stdout)

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def top(self, *fields: str) -> list[list[str]]:
        """``podman top``: one row per process, the ``fields`` asked for."""
        rows = podman("top", self.name, *fields).stdout.splitlines()[1:]
        return [row.split(None, len(fields) - 1) for row in rows]

    def workers(self) -> list[int]:
        """Host pids of the worker processes."""
        return [int(pid) for pid, args in self.top("hpid", "args") if "worker.service" in args]

    def remove(self) -> None:
        podman("rm", "-f", "-t", "0", self.name, check=False)

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def metric(url: str, name: str) -> float:
    """A metric's value summed over its series, from ``/metrics``."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + " ", name + "{"))
    )


def readiness(url: str) -> dict:
    return json.loads(httpx.get(url + "/readyz", timeout=5).text)
