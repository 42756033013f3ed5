"""What the alerts say and how many pages one cause raises: the summaries the rule tests
expect, ``amtool check-config`` on the Alertmanager configuration, and a real Alertmanager
(Debian's prometheus-alertmanager) given the alerts that one cause fires."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.monitoring.prometheus_server import MONITORING, tool
from tests.serving.conftest import free_port

CONFIG = MONITORING / "alertmanager" / "alertmanager.yml"


def alertmanager_tool(name: str) -> str:
    return tool(name, package="prometheus-alertmanager")


def test_alert_texts_name_the_job_once():
    """Every alert's summary, as its rule test expects it (promtool checks them exactly):
    the job is already "imgclf", so "imgclf {{ $labels.job }}" read "imgclf imgclf"."""
    cases = yaml.safe_load((MONITORING / "prometheus" / "rules_test.yml").read_text())["tests"]
    texts = [
        text
        for case in cases
        for check in case.get("alert_rule_test", [])
        for alert in check["exp_alerts"]
        for text in alert["exp_annotations"].values()
    ]
    assert len(texts) >= 30
    assert [text for text in texts if "imgclf imgclf" in text] == []


def test_amtool_checks_the_alertmanager_config():
    result = subprocess.run(
        [alertmanager_tool("amtool"), "check-config", str(CONFIG)], capture_output=True, text=True
    )
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_alerts_the_inhibit_rules_name_exist():
    """An inhibit rule naming an alert that rules.yml does not have would silently do
    nothing."""
    alerts = {
        rule["alert"]
        for group in yaml.safe_load((MONITORING / "prometheus" / "rules.yml").read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    config = yaml.safe_load(CONFIG.read_text())
    named = set()
    for rule in config["inhibit_rules"]:
        for matcher in rule["source_matchers"] + rule["target_matchers"]:
            if matcher.startswith("alertname"):
                named.update(matcher.split("=", 1)[1].lstrip("~").strip('"').split("|"))
    assert named and named <= alerts, named - alerts


@pytest.fixture
def alertmanager(tmp_path: Path):
    port = free_port()
    process = subprocess.Popen(
        [
            alertmanager_tool("prometheus-alertmanager"),
            f"--config.file={CONFIG}",
            f"--storage.path={tmp_path}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, "Alertmanager exited"
            assert time.time() < deadline, "Alertmanager never became ready"
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def alert(name: str, severity: str, **labels: str) -> dict:
    return {"labels": {"alertname": name, "severity": severity, "job": "imgclf", **labels}}


def test_one_cause_leaves_one_page_standing(alertmanager):
    """Traffic of another kind on digits: its drift alert (one for the model), and the
    label-free estimate falling on both replicas, off the labels, and a drift warning.
    Beside it, fashion's drift warning (another model), a replica that cannot be scraped
    with its workers missing, and server errors with slow requests. The critical cause
    mutes the warnings it brings; fashion's warning stands."""
    digits = {"model": "digits"}
    alerts = [
        alert("ImgclfPredictionDriftCritical", "critical", **digits),
        alert("ImgclfPredictionDriftWarning", "warning", **digits),
        alert("ImgclfEstimatedAccuracyDrop", "warning", instance="a:3000", **digits),
        alert("ImgclfEstimatedAccuracyDrop", "warning", instance="b:3000", **digits),
        alert("ImgclfAccuracyEstimateOff", "warning", instance="a:3000", **digits),
        alert("ImgclfPredictionDriftWarning", "warning", model="fashion"),
        alert("ImgclfTargetDown", "critical", instance="c:3000"),
        alert("ImgclfWorkersMissing", "warning", instance="c:3000"),
        alert("ImgclfWorkerDied", "warning", instance="d:3000"),
        alert("ImgclfWorkersMissing", "warning", instance="d:3000"),
        alert("ImgclfHighServerErrorRatio", "critical"),
        alert("ImgclfHighLatencyP99", "warning"),
    ]
    httpx.post(f"{alertmanager}/api/v2/alerts", json=alerts, timeout=10).raise_for_status()

    def standing() -> list[tuple[str, str]]:
        listed = httpx.get(f"{alertmanager}/api/v2/alerts", timeout=10).json()
        assert len(listed) == len(alerts)
        return sorted(
            (a["labels"]["alertname"], a["labels"].get("instance", a["labels"].get("model", "")))
            for a in listed
            if not a["status"]["inhibitedBy"]
        )

    expected = [
        ("ImgclfHighServerErrorRatio", ""),
        ("ImgclfPredictionDriftCritical", "digits"),
        ("ImgclfPredictionDriftWarning", "fashion"),
        ("ImgclfTargetDown", "c:3000"),
        ("ImgclfWorkersMissing", "d:3000"),
    ]
    deadline = time.time() + 10  # the inhibitor reads the alerts asynchronously
    while standing() != expected and time.time() < deadline:
        time.sleep(0.2)
    assert standing() == expected
    # The same alert on every replica of a model is one notification.
    groups = httpx.get(f"{alertmanager}/api/v2/alerts/groups", timeout=10).json()
    estimate = [g for g in groups if g["labels"].get("alertname") == "ImgclfEstimatedAccuracyDrop"]
    assert [(g["labels"], len(g["alerts"])) for g in estimate] == [
        ({"alertname": "ImgclfEstimatedAccuracyDrop", "job": "imgclf", "model": "digits"}, 2)
    ]
