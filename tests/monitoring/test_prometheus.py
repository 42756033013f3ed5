"""A real Prometheus scraping a real ``bentoml serve`` under traffic: every metric, promtool's
checks, the rules' unit tests, and every dashboard query returning data."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram

from monitoring import metrics, scrape
from serving.core.releases import set_shadow
from tests.monitoring.prometheus_server import MONITORING, is_ready, query, start_prometheus, tool
from tests.serving.conftest import Server
from tests.serving.variants import publish_variant, tamper
from training.datasets import read_manifest

RATE_INTERVAL = "1m"


@pytest.fixture(scope="module")
def served(digits_model, digits_run, tmp_path_factory):
    """A model folder following its newest version: the digits model as versions 1 and 2,
    and a version 3 corrupted after it was published. The server refuses 3, serves 2, and
    version 1 shadows every request (so the version and shadow metrics and panels have
    data too)."""
    folder = tmp_path_factory.mktemp("repository") / "digits"
    shutil.copytree(digits_model, folder / "1")
    publish_variant(folder / "1", 2)
    set_shadow(folder, 1, 1.0)
    tamper(publish_variant(folder / "1", 3))
    server = Server(
        folder,
        env={
            "IMGCLF_VERSION_POLL_S": "0.5",
            "IMGCLF_DRIFT_WINDOW": "200",
            "IMGCLF_DRIFT_MIN_SAMPLES": "50",
            "IMGCLF_DRIFT_INTERVAL_S": "1",
            "IMGCLF_FEEDBACK_MIN_SAMPLES": "20",
        },
    )
    server.wait_ready()
    test_split = random.Random(0).sample(read_manifest(digits_run)["test"], 60)  # every class
    images = [(s.path.read_bytes(), s.label) for s in test_split]
    stop = threading.Event()

    def traffic():
        """Predictions, labels for them (with one duplicate each round), and mistakes."""
        labels = []
        with httpx.Client(base_url=server.url, timeout=30) as client:
            while not stop.is_set():
                for index, (data, label) in enumerate(images):
                    if stop.is_set():
                        break
                    answer = client.post(
                        "/predict", content=data, headers={"Content-Type": "image/png"}
                    )
                    if answer.status_code == 200:
                        labels.append({"request_id": answer.json()["request_id"], "label": label})
                    if index % 10 == 0:
                        client.post("/feedback", json=labels)
                        client.post("/feedback", json=labels[-1:])  # a duplicate: 409
                        client.get("/feedback")
                        labels = []
                        client.post(
                            "/predict_batch",
                            files=[("images", ("a.png", data)), ("images", ("b.png", data))],
                        )
                        client.post(
                            "/predict",
                            content=b"not an image",
                            headers={"Content-Type": "image/png"},
                        )
                        client.post(
                            "/predict",
                            content=data,
                            params={"top_k": "0"},
                            headers={"Content-Type": "image/png"},
                        )
                        client.get("/metadata")
                    time.sleep(0.01)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    yield server
    stop.set()
    thread.join(timeout=30)
    server.stop()


@pytest.fixture(scope="module")
def prometheus(served, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("prometheus")
    process, url = start_prometheus([served.url.removeprefix("http://")], workdir)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:  # until drift has been computed and scraped
            if (
                is_ready(url)
                and query(url, "imgclf_drift_js_distance")
                and query(url, f"rate(imgclf_requests_total[{RATE_INTERVAL}]) > 0")
            ):
                break
            time.sleep(0.5)
        else:
            pytest.fail("Prometheus never saw drift computed by the service")
        time.sleep(3)  # a few more scrapes and rule evaluations
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def our_metric_names() -> list[tuple[str, type]]:
    return [
        (value._name, type(value))
        for value in vars(metrics).values()
        if isinstance(value, (Counter, Gauge, Histogram))
    ]


def test_every_imgclf_metric_is_exported_and_scraped(served, prometheus):
    text = httpx.get(served.url + "/metrics").text
    for name, kind in our_metric_names():
        exported = name + ("_total" if kind is Counter else "_bucket" if kind is Histogram else "")
        assert f"\n{exported}" in text or text.startswith(exported), exported
        assert query(prometheus, exported), f"Prometheus has no {exported}"
    assert not any(":" in name for name, _ in our_metric_names())
    info = query(prometheus, "imgclf_model_info")[0]["metric"]
    assert (info["name"], info["version"], info["provider"]) == (
        "digits",
        "2",
        "CPUExecutionProvider",
    )
    # Every worker (one per core by default) is ready and warmed the same batch sizes.
    assert float(query(prometheus, "min(imgclf_ready)")[0]["value"][1]) == 1
    warmed = {s["metric"]["batch_size"] for s in query(prometheus, "imgclf_warmed_batch_size")}
    assert warmed == {"1", "2", "4", "8", "16", "32", "64"}


def test_a_metrics_file_still_empty_does_not_fail_the_scrape(served):
    """A starting worker creates its metrics file before it sizes it, and one killed in that
    instant leaves it empty for good: prometheus_client's collector failed on it (and under
    BentoML's timeout the scrape hung instead of failing)."""
    worker = psutil.Process(served.process.pid).children(recursive=True)[-1]
    empty = Path(worker.environ()["PROMETHEUS_MULTIPROC_DIR"]) / "counter_4194303.db"
    empty.touch()
    try:
        answer = httpx.get(served.url + "/metrics", timeout=10)
    finally:
        empty.unlink()
    assert answer.status_code == 200
    assert answer.headers["content-type"] == CONTENT_TYPE_LATEST
    assert "\nimgclf_requests_total{" in answer.text


def test_a_dead_workers_gauges_removed_mid_scrape_do_not_fail_it(tmp_path, monkeypatch):
    """A worker that replaces a dead one removes the dead one's gauges; removed between the
    scrape's listing and its read, a file failed prometheus_client's merge (a JSON 500 in
    CI). Real files, written by a real process; the removal put in that instant."""
    writer = (
        "from prometheus_client import Counter, Gauge\n"
        "Counter('imgclf_probe', 'probe').inc(3)\n"
        "Gauge('imgclf_probe_ready', 'probe', multiprocess_mode='all').set(1)\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", writer], env=env, check=True)
    (gauge,) = tmp_path.glob("gauge_all_*.db")
    listed = scrape._written_files

    def listing_then_the_gauge_removed(folder):
        files = listed(folder)
        gauge.unlink(missing_ok=True)
        return files

    monkeypatch.setattr(scrape, "_written_files", listing_then_the_gauge_removed)
    text = scrape.exposition(str(tmp_path)).decode()
    assert "imgclf_probe_total 3.0" in text
    assert "imgclf_probe_ready" not in text  # its file is gone: the dead worker's gauge too


def test_promtool_check_metrics_has_nothing_to_say_about_ours(served):
    text = httpx.get(served.url + "/metrics").text
    result = subprocess.run(
        [tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True
    )
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "imgclf" in line]
    assert ours == []


def test_promtool_checks_config_and_rules():
    promtool = tool("promtool")
    config = subprocess.run(
        [promtool, "check", "config", str(MONITORING / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
    )
    assert config.returncode == 0, config.stdout + config.stderr
    rules = subprocess.run(
        [promtool, "check", "rules", str(MONITORING / "prometheus" / "rules.yml")],
        capture_output=True,
        text=True,
    )
    assert rules.returncode == 0 and "SUCCESS" in rules.stdout, rules.stdout + rules.stderr
    tests = subprocess.run(
        [promtool, "test", "rules", "rules_test.yml"],
        cwd=MONITORING / "prometheus",
        capture_output=True,
        text=True,
    )
    assert tests.returncode == 0 and "SUCCESS" in tests.stdout, tests.stdout + tests.stderr


def test_rule_tests_cover_every_alert_firing_and_quiet():
    alerts = {
        rule["alert"]
        for group in yaml.safe_load((MONITORING / "prometheus" / "rules.yml").read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    cases = yaml.safe_load((MONITORING / "prometheus" / "rules_test.yml").read_text())["tests"]
    fired = {c["alertname"] for t in cases for c in t.get("alert_rule_test", []) if c["exp_alerts"]}
    quiet = {
        c["alertname"] for t in cases for c in t.get("alert_rule_test", []) if not c["exp_alerts"]
    }
    assert alerts == fired == quiet


def dashboard_queries() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana" / "dashboards" / "imgclf.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_dashboard_is_provisionable():
    text = (MONITORING / "grafana" / "dashboards" / "imgclf.json").read_text()
    assert "${DS_" not in text
    dashboard = json.loads(text)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for needed in (
        "request rate",
        "error ratio",
        "p99",
        "stage",
        "batch",
        "class mix",
        "confidence",
        "psi",
        "freshness",
        "model version",
        "waiting for a batch",
        "workers ready",
        "start-up",
        "calibrated warning threshold",
        "against its critical threshold",
        "labelled feedback",
        "recall per class",
        "calibration error",
        "feedback store",
        "answers by version",
        "shadow agreement",
        "live and shadow",
        "shadow copies",
        "versions refused",
    ):
        assert needed in titles, needed
    # Drift is drawn against each statistic's own threshold, not one fixed band.
    psi_panel = next(p for p in dashboard["panels"] if "PSI" in p["title"])
    assert any("imgclf_drift_threshold" in t["expr"] for t in psi_panel["targets"])
    ratio = next(p for p in dashboard["panels"] if "critical threshold" in p["title"])
    steps = [s["value"] for s in ratio["fieldConfig"]["defaults"]["thresholds"]["steps"]]
    assert steps == [None, 1]


def test_every_dashboard_query_returns_data(prometheus):
    empty = []
    for expr in dashboard_queries():
        filled = expr.replace("$job", "imgclf").replace("$__rate_interval", RATE_INTERVAL)
        result = query(prometheus, filled)
        values = [float(sample["value"][1]) for sample in result]
        if not values or not any(math.isfinite(v) for v in values):
            empty.append(filled)
    assert empty == []
    assert len(dashboard_queries()) >= 25


def test_drift_gauges_follow_the_traffic(prometheus):
    window = float(query(prometheus, "imgclf_drift_window_samples")[0]["value"][1])
    assert 50 <= window <= 200
    psi = {
        s["metric"]["signal"]: float(s["value"][1]) for s in query(prometheus, "imgclf_drift_psi")
    }
    assert set(psi) == {"class", "confidence", "entropy", "brightness", "contrast"}
    freshness = float(
        query(prometheus, "time() - imgclf_drift_last_computed_timestamp_seconds")[0]["value"][1]
    )
    assert freshness < 30
    errors = {s["metric"]["reason"] for s in query(prometheus, "imgclf_request_errors_total")}
    assert {"not_an_image", "bad_top_k", "duplicate_feedback"} <= errors
    thresholds = query(prometheus, "imgclf_drift_threshold")
    # two levels of every statistic of every signal, and of the embedding's domain classifier
    assert len(thresholds) == 2 * (2 + 4 * 3 + 1)
    above_one = query(prometheus, "imgclf:drift_statistic:ratio_critical")
    assert len(above_one) == 15


def test_feedback_figures_reach_prometheus(prometheus):
    """Held-out images with their true labels: labelled accuracy near the held-out accuracy,
    every outcome counted by class."""
    accuracy = float(query(prometheus, "imgclf_feedback_accuracy_ratio")[0]["value"][1])
    held_out = float(query(prometheus, "imgclf_reference_accuracy_ratio")[0]["value"][1])
    assert 0.8 <= accuracy <= 1.0 and held_out > 0.8
    counted = query(prometheus, 'sum(imgclf_feedback_total{outcome="correct"})')
    assert float(counted[0]["value"][1]) >= 20
    recall = {s["metric"]["class"] for s in query(prometheus, "imgclf_feedback_recall_ratio")}
    assert recall <= {str(digit) for digit in range(10)} and len(recall) >= 5
