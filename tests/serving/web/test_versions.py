"""New model versions in running servers, with real ``imgclf serve`` processes on one model
folder: a release (pin and publish, then under load shadow, promote, roll back) answered 200
every time, each answer from the version the roles named when it was sent, two servers and all
their workers converging; the shadow's agreement equal to what the two models say offline;
a corrupt version refused by the commands and by the servers, the version before it still
answering."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.core.runtime import ClassifierRuntime
from tests.conftest import assert_one_line_error, cli_ok, run_cli
from tests.serving.cases import encode
from tests.serving.conftest import Server
from tests.serving.load import Load
from tests.serving.variants import publish_variant, tamper

POLL_S = 0.5
#: How long a switch may take to reach every worker: the poll interval, then loading,
#: verifying and warming the version (under 1 s for this model, a few on a loaded machine).
CONVERGE_S = POLL_S + 15
ENV = {
    "IMGCLF_VERSION_POLL_S": str(POLL_S),
    # The load here is meant to be served, not shed: 503s would be the test's own overload.
    "IMGCLF_MAX_LATENCY_MS": "20000",
    "IMGCLF_DRIFT_INTERVAL_S": "1",
}


@pytest.fixture(scope="module")
def held_out_pngs(test_split) -> list[bytes]:
    """The run's held-out test images (``test_split``), as PNG files."""
    return [encode(image, "PNG") for image, _ in test_split]


@pytest.fixture
def model_folder(digits_model, tmp_path) -> Path:
    """A model folder of its own holding the digits model as version 1."""
    folder = tmp_path / "repository" / "digits"
    shutil.copytree(digits_model, folder / "1")
    return folder


def served_versions(url: str) -> dict[tuple[str, str], float]:
    """``{(pid, role): version}`` from ``imgclf_served_version``, one per live worker."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {
        (sample.labels["pid"], sample.labels["role"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "imgclf_served_version"
    }


def counter(url: str, name: str, **labels) -> float:
    answer = httpx.get(url + "/metrics", timeout=10)
    assert answer.status_code == 200, answer.text
    text = answer.text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def converge(servers: list[tuple[Server, int]], role: str, version: int) -> float:
    """Seconds until every worker of every server serves ``version`` as ``role``."""
    started = time.monotonic()
    while time.monotonic() - started < CONVERGE_S:
        views = [(served_versions(s.url), workers) for s, workers in servers]
        if all(
            sum(1 for (_, r), v in seen.items() if r == role and v == version) == workers
            for seen, workers in views
        ):
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"not every worker serves {role} version {version}: {views}")


def test_a_release_under_load_answers_every_request_from_the_version_named(
    model_folder, held_out_pngs
):
    images = held_out_pngs
    cli_ok("pin", str(model_folder), "1")  # hold version 1 while version 2 is released
    with (
        Server(model_folder, env=ENV, args=("--workers", "2")) as first,
        Server(model_folder, env=ENV, args=("--workers", "1")) as second,
    ):
        servers = [(first, 2), (second, 1)]
        converge(servers, "live", 1)
        # Version 2 is published while the servers run, before the load starts, staged and
        # renamed into place as imgclf export publishes (what is tested is the release, not
        # the conversion: a real export, 20 s of CPU, was this test's longest step; the
        # docs' release page and the README publish with imgclf export beside a server).
        publish_variant(model_folder / "1", 2, noise=0.05, seed=2)
        with Load(first.url, images) as load:
            time.sleep(2 * POLL_S)  # pinned: a new version alone changes nothing
            cli_ok("shadow", str(model_folder), "2", "--fraction", "0.5")
            converge(servers, "shadow", 2)
            time.sleep(1.5)
            shadowed = counter(first.url, "imgclf_shadow_images_total", version="2")
            promoted_at = time.monotonic()
            cli_ok("promote", str(model_folder), "2")
            promote_took = converge(servers, "live", 2)
            promoted = time.monotonic()
            converge(servers, "shadow", 0)  # the promoted shadow is the live version now
            time.sleep(1.5)
            rolled_back_at = time.monotonic()
            cli_ok("rollback", str(model_folder))
            rollback_took = converge(servers, "live", 1)
            rolled_back = time.monotonic()
            time.sleep(1)
        logs = [server.output() for server, _ in servers]
    statuses = [status for _, _, status, _ in load.answers]
    assert len(statuses) > 300
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert load.between(0, promoted_at) == {1}
    assert load.between(promoted, rolled_back_at) == {2}
    assert load.between(rolled_back, float("inf")) == {1}
    assert {v for *_, v in load.answers} == {1, 2}
    assert shadowed > 0  # copies of live requests reached the shadow
    assert max(promote_took, rollback_took) < CONVERGE_S
    for log in logs:
        assert "live version 1 -> 2" in log and "live version 2 -> 1" in log
        assert "shadow version 2 gets 0.5 of version 1's requests" in log
        assert "Traceback" not in log
    print(
        f"{len(statuses)} answers; every worker switched within {promote_took:.2f} s "
        f"(promote) and {rollback_took:.2f} s (rollback)"
    )


def test_shadow_agreement_is_what_the_two_models_say_and_a_corrupt_version_is_refused(
    model_folder, held_out_pngs
):
    version_two = publish_variant(model_folder / "1", 2, noise=0.6, seed=3)
    cli_ok("pin", str(model_folder), "1")
    images = held_out_pngs
    with Server(model_folder, env=ENV, args=("--workers", "1")) as server, server.client() as http:
        cli_ok("shadow", str(model_folder), "2")
        converge([(server, 1)], "shadow", 2)
        answers = [http.post("/predict", files={"image": ("d.png", im)}).json() for im in images]
        assert {answer["model_version"] for answer in answers} == {1}
        # The two models' answers offline, on the same decoded images.
        one, two = ClassifierRuntime(model_folder / "1"), ClassifierRuntime(version_two)
        batch = np.stack([one.preprocess(image) for image in images])
        live, shadow = one.predict(batch), two.predict(batch)
        agreed = int((live.argmax(axis=1) == shadow.argmax(axis=1)).sum())
        assert 0 < agreed < len(images)  # a different model, not a copy
        deadline = time.monotonic() + 10
        while counter(server.url, "imgclf_shadow_images_total", outcome="compared") < len(images):
            assert time.monotonic() < deadline, "the shadow never compared every image"
            time.sleep(0.1)
        assert counter(server.url, "imgclf_shadow_images_total", outcome="dropped") == 0
        assert counter(server.url, "imgclf_shadow_agreements_total", version="2") == agreed
        evidence = http.get("/metadata").json()["versions"]["shadow"]
        assert evidence["agreement"] == pytest.approx(agreed / len(images))
        assert evidence["mean_confidence"]["shadow"] == pytest.approx(shadow.max(axis=1).mean())
        assert evidence["mean_confidence"]["live"] == pytest.approx(live.max(axis=1).mean())
        # OIP: both versions listed, and the shadow answers when named.
        assert http.get("/v2/models/digits").json()["versions"] == ["1", "2"]
        pixels = batch[:2]
        infer = {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "FP32",
                    "shape": list(pixels.shape),
                    "data": pixels.ravel().tolist(),
                }
            ]
        }
        named = http.post("/v2/models/digits/versions/2/infer", json=infer).json()
        assert named["model_version"] == "2"
        assert np.allclose(np.reshape(named["outputs"][0]["data"], (2, -1)), shadow[:2], atol=1e-5)
        assert http.post("/v2/models/digits/versions/7/infer", json=infer).status_code == 404

        # Following the newest (2), then a corrupt version 3: the commands refuse it, and so
        # does the server; version 2 answers.
        cli_ok("pin", str(model_folder), "--latest")
        converge([(server, 1)], "live", 2)
        tamper(publish_variant(model_folder / "1", 3))
        refused = run_cli("promote", str(model_folder), "3")
        assert_one_line_error(refused, "version 3 does not verify", "does not match its hash")
        refused = run_cli("pin", str(model_folder), "--latest")
        assert_one_line_error(refused, "does not match its hash", "refuse it and serve version 2")
        deadline = time.monotonic() + 10
        while counter(server.url, "imgclf_version_refusals_total", version="3") < 1:
            assert time.monotonic() < deadline, "version 3 was never refused"
            time.sleep(0.1)
        after = http.post("/predict", files={"image": ("d.png", images[0])}).json()
        assert after["model_version"] == 2
        listing = run_cli("versions", str(model_folder), "--server", server.url)
        assert listing.returncode == 0, listing.stderr
        lines = listing.stdout.splitlines()
        row = next(line for line in lines if line.strip().startswith("3 "))
        assert "does not verify [1]" in row and "refused" in row and len(row) <= 120, row
        assert any(
            line.startswith("[2] server refused version 3:") and "does not match its hash" in line
            for line in lines
        ), lines
        assert "version 3 refused" in server.output()
