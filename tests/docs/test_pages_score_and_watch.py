"""The pages of batch scoring, monitoring, several servers and troubleshooting, run as
written from a clone after ``make run`` (its server on port 3000), with the outputs each page
shows checked."""

from __future__ import annotations

import csv
import json
import re
import time

import httpx
import pyarrow.parquet as pq

from tests.conftest import REPO
from tests.docs.runbook import MAKE_RUN_SERVES, page_blocks, predict


def test_batch_scoring(scratch):
    scratch.run_blocks(page_blocks("docs/batch-scoring.md"))
    with open(scratch.root / "scores.csv") as handle:
        labels = sorted(row["label"] for row in csv.DictReader(handle))
    assert labels == ["0", "3", "7"]
    assert sorted(pq.read_table(scratch.root / "scores.parquet")["label"].to_pylist()) == labels
    with open(scratch.root / "listed.csv") as handle:
        assert sorted(row["label"] for row in csv.DictReader(handle)) == labels
    on_ray = pq.read_table(scratch.root / "ray-scores.parquet")["label"].to_pylist()
    assert sorted(on_ray) == labels


def test_monitoring(scratch):
    scratch.run(MAKE_RUN_SERVES)
    drift, labels, prometheus, promtool = page_blocks("docs/monitoring.md")
    everything, sevens = scratch.run_blocks([drift]).values()  # the second exits 3
    assert "report: drift.json" in everything and "critical" in sevens
    assert json.loads((scratch.root / "drift.json").read_text())["status"] != "critical"
    outputs = list(scratch.run_blocks([labels]).values())
    assert json.loads(outputs[2]) | {"labelled": 2} == {
        "accepted": 2, "correct": 1, "labelled": 2, "accuracy": 0.5
    }  # fmt: skip
    assert json.loads(outputs[3])["labelled"] == 2
    scratch.run_blocks([prometheus, promtool])
    deadline = time.monotonic() + 30
    while True:  # Prometheus, as the page starts it, scrapes make run's server
        up = httpx.get(scratch.prometheus_url + "/api/v1/query", params={"query": "up"}).json()
        if any(sample["value"][1] == "1" for sample in up["data"]["result"]):
            break
        assert time.monotonic() < deadline, up
        time.sleep(0.5)


def test_several_servers(scratch):
    scratch.run(MAKE_RUN_SERVES)
    scratch.run_blocks(page_blocks("docs/several-servers.md"))
    first = httpx.get(scratch.url("3000") + "/metadata", timeout=10).json()
    second = httpx.get(scratch.url("3003") + "/metadata", timeout=10).json()
    assert (first["name"], second["name"]) == ("digits", "second")
    predict(scratch, port="3003")
    assert predict(scratch)["label"] == "3"


def test_troubleshooting_rows_say_what_happens(scratch):
    """The rows a user can reproduce: each quoted symptom is what the command prints."""
    page = (REPO / "docs/troubleshooting.md").read_text()
    scratch.run(MAKE_RUN_SERVES)
    busy = scratch.run(f"{MAKE_RUN_SERVES} 2>&1  # exit 1")
    quoted = re.search(r"`(error: cannot listen on 127\.0\.0\.1:)3000`", page).group(1)
    assert quoted + scratch.ports["3000"] in busy
    (scratch.root / "elsewhere").mkdir()
    missing = scratch.run(
        "cd elsewhere && curl -F image=@examples/digit-3.png http://127.0.0.1:3000/predict 2>&1"
        "  # exit 26"
    )
    quoted = re.search(r"`(curl: \(26\)[^`]+)`", page).group(1)
    assert quoted in missing
    few = scratch.run("imgclf score examples --model model_repository/digits --output s.csv")
    assert "too few images to judge" in few and "too few images to judge" in page
    (scratch.root / "broken").mkdir()
    (scratch.root / "broken/not-an-image.png").write_bytes(b"not an image")
    scratch.run("imgclf score broken --model model_repository/digits --output b.csv  # exit 4")
    assert "`imgclf score` exits 4" in page
