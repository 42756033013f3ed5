"""Every docs page's command blocks, run as written in the order of docs/index.md, each page
from where it says it starts (a clone after ``make run``, its server on port 3000), with the
outputs the page shows checked. ``tests/docs/runbook.py`` says what the runner substitutes.
(The tests that run pages use the cached digits model, so they are marked slow.)"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import time

import httpx
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO
from tests.docs.runbook import PAGES, Scratch, blocks, page_blocks

#: What ``make run`` ends with (the Makefile's ``serve`` line, at its defaults).
MAKE_RUN_SERVES = "imgclf serve --model model_repository/digits --port 3000"

#: The pages whose ``run`` blocks a test here (or test_readme.py) runs.
RUN_BY_A_TEST = {
    "README.md",
    "docs/training.md",
    "docs/export.md",
    "docs/serving.md",
    "docs/releasing.md",
    "docs/open-inference-protocol.md",
    "docs/batch-scoring.md",
    "docs/monitoring.md",
    "docs/several-servers.md",
}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_code_block_says_whether_a_test_runs_it(page):
    """A block is run by its page's test or says why it cannot be (``docs-test: skip:``);
    a page with blocks to run has a test that runs them."""
    found = blocks(page)
    unmarked = [block.where for block in found if block.marker is None]
    assert not unmarked, f"mark each block <!-- docs-test: run --> or skip: WHY: {unmarked}"
    name = str(page.relative_to(REPO))
    if any(block.marker == "run" for block in found):
        assert name in RUN_BY_A_TEST, f"{name} has blocks to run but no test runs them"


@pytest.fixture
def scratch(tmp_path, digits_home, digits_run, digits_model):
    folder = Scratch.after_make_run(tmp_path, digits_home, digits_run, digits_model)
    yield folder
    folder.stop()


def predict(scratch: Scratch, image: str = "examples/digit-3.png", port: str = "3000") -> dict:
    with open(scratch.root / image, "rb") as handle:
        answer = httpx.post(scratch.url(port) + "/predict", files={"image": handle}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def answered_by(scratch: Scratch, version: int, timeout: float = 20) -> dict:
    """A /predict answer from ``version``, once the server has switched to it."""
    deadline = time.monotonic() + timeout
    while (answer := predict(scratch))["model_version"] != version:
        assert time.monotonic() < deadline, f"still version {answer['model_version']}"
        time.sleep(0.2)
    return answer


def row(versions_output: str, version: int) -> str:
    (line,) = [line for line in versions_output.splitlines() if line.split()[:1] == [str(version)]]
    return line


def test_training(scratch):
    scratch.run_blocks(page_blocks("docs/training.md"))
    on_labelled_folders = json.loads((scratch.root / "eval/evaluation.json").read_text())
    on_the_test_split = json.loads((scratch.root / "eval-test/evaluation.json").read_text())
    assert on_labelled_folders["count"] == 1797 and on_labelled_folders["accuracy"] > 0.9
    assert on_the_test_split["accuracy"] > 0.9


def test_export(scratch):
    outputs = scratch.run_blocks(page_blocks("docs/export.md"))
    published = scratch.root / "model_repository/digits/2"
    assert (published / "model.int8.onnx").exists()  # "publishes 2"
    assert "digits:1" in "".join(outputs.values())


def test_serving(scratch):
    scratch.run(MAKE_RUN_SERVES)
    outputs = list(scratch.run_blocks(page_blocks("docs/serving.md")).values())
    three, seven, batch, metadata, _live, ready, metrics, openapi = outputs
    three, seven, batch = json.loads(three), json.loads(seven), json.loads(batch)
    assert three["label"] == "3" and len(three["top_k"]) == 3
    assert seven["label"] == "7"
    assert [answer["label"] for answer in batch] == ["0", "7"]
    assert json.loads(metadata)["name"] == "digits"
    assert json.loads(ready)["workers"]["ready"] >= 1
    assert "imgclf_requests_total" in metrics
    assert "/predict" in json.loads(openapi)["paths"]


def test_releasing(scratch):
    scratch.run(MAKE_RUN_SERVES)
    (block,) = page_blocks("docs/releasing.md")
    train, pin, export, shadow, versions, promote, rollback, follow = block.commands()
    for command in (train, pin, export, shadow):
        scratch.run(command)
    assert (scratch.root / "model_repository/digits/2/model.onnx").exists()  # "publishes 2"
    for _ in range(20):  # traffic, so that the shadow has evidence
        assert predict(scratch)["model_version"] == 1  # pinned while 2 is tried
    evidence = scratch.run(versions)
    assert "shadow" in row(evidence, 2) and "live" in row(evidence, 1), evidence
    scratch.run(promote)
    assert answered_by(scratch, 2)["label"] == "3"
    scratch.run(rollback)
    answered_by(scratch, 1)
    scratch.run(follow)
    answered_by(scratch, 2)


def test_open_inference_protocol(scratch):
    scratch.run(MAKE_RUN_SERVES)
    client, raw = page_blocks("docs/open-inference-protocol.md")
    assert client.language == "python"
    (scratch.root / "client.py").write_text(scratch.as_here(client.text))
    printed = scratch.run(".venv/bin/python client.py")
    assert re.match(r"\[\[b'[0-9.]+:3:3'", printed), printed  # as the page shows
    (command,) = raw.commands()
    answer = json.loads(scratch.run(command))
    (probabilities,) = answer["outputs"]
    assert probabilities["shape"] == [1, 10]
    assert max(range(10), key=probabilities["data"].__getitem__) == 3


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


#: What the documented commands write at the repository root (the page tests above see them
#: appear in their scratch copy): none of it is for git.
WRITTEN_BY_THE_DOCS = [
    "runs/digits-v2/best.keras", "model_repository/second/1/model.onnx", "scores.csv",
    "scores.csv.drift.json", "scores.parquet", "scores.parquet.drift.json", "listed.csv",
    "listed.csv.drift.json", "ray-scores.parquet", "ray-scores.parquet.drift.json", "paths.txt",
    "drift.json", "eval/evaluation.json", "eval-test/evaluation.json",
    "monitoring/prometheus/local.yml",
]  # fmt: skip


def test_what_the_documented_commands_write_is_ignored_by_git():
    paths = [str(REPO / name) for name in WRITTEN_BY_THE_DOCS]
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *paths], cwd=REPO, capture_output=True, text=True
    ).stdout.split()
    assert sorted(set(paths) - set(ignored)) == []
