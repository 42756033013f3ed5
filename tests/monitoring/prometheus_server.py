"""A real Prometheus (Debian's package) for the tests: the project's scrape configuration and
rules, scraping the given targets every second."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import REPO
from tests.serving.conftest import free_port

MONITORING = REPO / "monitoring"


def tool(name: str, package: str = "prometheus") -> str:
    """The path of a Debian-packaged binary; a failure in CI (.ci/run installs it), a skip
    elsewhere."""
    found = shutil.which(name)
    if found is None:
        message = f"{name} is not installed (Debian package {package}; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def start_prometheus(targets: list[str], workdir: Path) -> tuple[subprocess.Popen, str]:
    """Prometheus with ``monitoring/prometheus``'s configuration and rules, scraping
    ``targets`` (``host:port``, one job) and evaluating the rules every second; the process
    and its URL."""
    binary = tool("prometheus")
    shutil.copy(MONITORING / "prometheus" / "rules.yml", workdir / "rules.yml")
    config = yaml.safe_load((MONITORING / "prometheus" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["scrape_configs"][0]["static_configs"] = [{"targets": targets}]
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return process, f"http://127.0.0.1:{port}"


def is_ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def query(url: str, expr: str) -> list:
    response = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]
