"""Replicas, as users outgrow one machine for online serving: two containers of the image on
one mounted model repository, a real Prometheus scraping both with the project's rules. A
promotion reaches both under load with every answer 200; the fleet's drift recording rule
gives one judgement over both replicas where each replica alone sees only half the classes;
the dashboard's queries answer."""

from __future__ import annotations

import math
import shutil
import time
from collections import Counter

import httpx
import pytest

from tests.conftest import cli_ok
from tests.container.conftest import Container, shared_folder
from tests.monitoring.prometheus_server import is_ready, query, start_prometheus
from tests.monitoring.test_prometheus import dashboard_queries
from tests.serving.load import Load
from tests.serving.variants import publish_variant
from training.datasets import read_manifest

pytestmark = pytest.mark.container

ENV = {
    "IMGCLF_MODEL_DIR": "/models/digits",
    "IMGCLF_VERSION_POLL_S": "0.5",
    "IMGCLF_DRIFT_WINDOW": "200",
    "IMGCLF_DRIFT_MIN_SAMPLES": "50",
    "IMGCLF_DRIFT_INTERVAL_S": "1",
    "IMGCLF_FEEDBACK_MIN_SAMPLES": "20",
    "IMGCLF_MAX_LATENCY_MS": "20000",  # served, not shed: 503s would be our own overload
    "IMGCLF_DRAIN_WINDOW_S": "0",
}


@pytest.fixture(scope="module")
def fleet(image, digits_model, digits_run, tmp_path_factory):
    """Two replicas on one repository (version 1, and a variant as version 2; 1 pinned), and
    Prometheus scraping both as one job."""
    root = shared_folder("imgclf-fleet-")
    shutil.copytree(digits_model, root / "digits" / "1")
    publish_variant(root / "digits" / "1", 2, noise=0.05)
    cli_ok("pin", str(root / "digits"), "1")
    replicas = [Container(image, env=ENV, volumes=(f"{root}:/models:ro",)) for _ in range(2)]
    prometheus = None
    try:
        for replica in replicas:
            replica.wait_ready(workers=2)
        prometheus, url = start_prometheus(
            [replica.url.removeprefix("http://") for replica in replicas],
            tmp_path_factory.mktemp("prometheus"),
        )
        deadline = time.time() + 60
        while not (is_ready(url) and len(query(url, "up == 1")) == 2):
            assert time.time() < deadline, "Prometheus never scraped both replicas"
            time.sleep(0.5)
        yield root / "digits", replicas, url
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
        for replica in replicas:
            replica.remove()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def held_out(digits_run) -> list[tuple[bytes, str]]:
    return [(s.path.read_bytes(), s.label) for s in read_manifest(digits_run)["test"]]


def test_a_promotion_reaches_both_replicas_under_load(fleet, held_out):
    folder, replicas, _ = fleet
    images = [data for data, _ in held_out]
    loads = [Load(replica.url, images, concurrency=8) for replica in replicas]
    for load in loads:
        load.__enter__()
    try:
        time.sleep(1)
        promoted = time.monotonic()
        cli_ok("promote", str(folder), "2")
        deadline = promoted + 20
        while time.monotonic() < deadline:
            if all(set(v for *_, v in load.answers[-40:]) == {2} for load in loads):
                break
            time.sleep(0.1)
        converged = time.monotonic()
        time.sleep(1)
    finally:
        for load in loads:
            load.__exit__(None, None, None)
    assert converged < deadline, "not every replica serves version 2"
    for load in loads:
        assert Counter(status for *_, status, _ in load.answers) == Counter(
            {200: len(load.answers)}
        ), sorted(set(load.errors))[:5]
        assert load.between(0, promoted) == {1}
        assert load.between(converged, math.inf) == {2}


def predict_all(url: str, images: list[tuple[bytes, str]]) -> None:
    """Every image once, each answer labelled with its true class, and one mistake (not an
    image)."""
    with httpx.Client(base_url=url, timeout=30) as client:
        feedback = []
        for data, label in images:
            answer = client.post("/predict", content=data, headers={"Content-Type": "image/png"})
            assert answer.status_code == 200, answer.text
            feedback.append({"request_id": answer.json()["request_id"], "label": label})
        assert client.post("/feedback", json=feedback).status_code == 200
        mistake = client.post("/predict", content=b"text", headers={"Content-Type": "image/png"})
        assert mistake.status_code == 400


def test_one_fleet_drift_verdict_over_replicas_that_each_see_half_the_classes(fleet, held_out):
    """Digits 0-4 go to one replica, 5-9 to the other: each replica's own windows see half
    the classes (a class PSI far above critical), the fleet's traffic is the reference's mix.
    Version 1 shadows version 2 meanwhile (so the dashboard's shadow panels have data)."""
    folder, replicas, prometheus = fleet
    cli_ok("shadow", str(folder), "1", "--fraction", "1.0")
    low = [(d, label) for d, label in held_out if int(label) < 5]
    high = [(d, label) for d, label in held_out if int(label) >= 5]
    fleet_expr = 'job_version_signal:imgclf_drift_psi:fleet15m{version="2", signal="class"}'
    own_expr = 'max by (instance) (imgclf_drift_psi{signal="class"})'
    deadline = time.time() + 90
    while True:  # traffic, scraped as it flows, until each replica's windows hold it
        predict_all(replicas[0].url, low)
        predict_all(replicas[1].url, high)
        own = [float(s["value"][1]) for s in query(prometheus, own_expr)]
        fleet_psi = query(prometheus, fleet_expr)
        if fleet_psi and len(own) == 2 and min(own) > 1.0:
            break
        assert time.time() < deadline, (own, fleet_psi)
    assert len(fleet_psi) == 1, fleet_psi  # one verdict: no instance, no pid
    assert set(fleet_psi[0]["metric"]) - {"__name__"} == {"job", "version", "signal"}
    assert float(fleet_psi[0]["value"][1]) < 0.25, fleet_psi  # together: the reference's mix
    signals = query(prometheus, 'job_version_signal:imgclf_drift_psi:fleet15m{version="2"}')
    assert {s["metric"]["signal"] for s in signals} == {
        "class",
        "confidence",
        "entropy",
        "brightness",
        "contrast",
    }


def test_the_dashboard_queries_answer_for_the_fleet(fleet, held_out):
    """Every panel's query returns data; the shadow's and the fleet's figures are computed
    every second from windows of their own, so traffic goes on until they are."""
    _, replicas, prometheus = fleet
    deadline = time.time() + 60
    while True:
        empty = []
        for expr in dashboard_queries():
            filled = expr.replace("$job", "imgclf").replace("$__rate_interval", "1m")
            values = [float(sample["value"][1]) for sample in query(prometheus, filled)]
            if not any(math.isfinite(v) for v in values):
                empty.append(filled)
        if not empty or time.time() > deadline:
            break
        for replica in replicas:
            predict_all(replica.url, held_out[:100])
        time.sleep(1)
    assert empty == []
    ready = query(prometheus, "sum(imgclf_workers_ready)")
    assert float(ready[0]["value"][1]) == 4  # two workers in each of two replicas
