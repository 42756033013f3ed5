"""Stopping a container loses nothing, and a model repository mounted into it is followed:
``podman stop`` with slow uploads in flight, and a promotion then a stop under continuous
load from keep-alive clients."""

from __future__ import annotations

import shutil
import time
from collections import Counter

import pytest

from tests.conftest import cli_ok
from tests.container.conftest import Container, shared_folder
from tests.serving.load import Load, SlowUploads
from tests.serving.variants import publish_variant
from training.datasets import read_manifest

pytestmark = pytest.mark.container

WINDOW_S = 3.0


def test_podman_stop_answers_every_slow_request_in_flight(image):
    """24 slow uploads in flight when ``podman stop`` sends SIGTERM: /readyz turns 503, all
    24 are answered 200 (the default drain window, 5 s, passes first), the container exits
    0 well within the grace period the docs give."""
    with Container(image) as container:
        container.wait_ready(workers=2)
        with SlowUploads(container.url) as uploads:
            started = time.monotonic()
            code = container.stop(grace_s=30)
            stopped_s = time.monotonic() - started
            answers = uploads.answers()
        assert [a.status_code for a in answers] == [200] * 24, [a.text[:200] for a in answers]
        assert code == 0 and stopped_s < 25, (code, stopped_s)
        assert "drain complete" in container.logs()


@pytest.fixture
def repository(digits_model):
    """A model folder on the host, readable by the container's user: the digits model as
    version 1 and a variant as version 2, version 1 pinned."""
    root = shared_folder("imgclf-repository-")
    shutil.copytree(digits_model, root / "digits" / "1")
    publish_variant(root / "digits" / "1", 2, noise=0.05)
    cli_ok("pin", str(root / "digits"), "1")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_a_mounted_repository_is_followed_and_a_stop_under_load_loses_nothing(
    image, repository, digits_run
):
    """``imgclf promote`` on the host switches the container's live version under load from
    16 keep-alive callers, every answer 200; then ``podman stop`` under the same load: every
    request sent before the drain window ended is answered 200, and the container exits 0."""
    images = [sample.path.read_bytes() for sample in read_manifest(digits_run)["test"][:200]]
    env = {
        "IMGCLF_MODEL_DIR": "/models/digits",
        "IMGCLF_VERSION_POLL_S": "0.5",
        "IMGCLF_DRAIN_WINDOW_S": str(WINDOW_S),
        "IMGCLF_MAX_LATENCY_MS": "20000",  # served, not shed: 503s would be our own overload
    }
    with Container(image, env=env, volumes=(f"{repository}:/models:ro",)) as container:
        container.wait_ready(workers=2)
        with Load(container.url, images, concurrency=16) as load:
            time.sleep(1)
            promoted = time.monotonic()
            cli_ok("promote", str(repository / "digits"), "2")
            deadline = promoted + 20
            while time.monotonic() < deadline:  # until the last 50 answers all say 2
                recent = [version for _, _, _, version in load.answers[-50:]]
                if recent and set(recent) == {2}:
                    break
                time.sleep(0.1)
            converged = time.monotonic()
            time.sleep(1)
            signalled = time.monotonic()
            code = container.stop(grace_s=30)
            time.sleep(0.5)
        before_promotion = load.between(0, promoted)
        after_convergence = load.between(converged, signalled)
        statuses = Counter(load.sent_before(signalled + WINDOW_S))
        in_window = [s for s, _, _, _ in load.answers if signalled <= s < signalled + WINDOW_S]
        assert before_promotion == {1} and after_convergence == {2}
        assert converged < deadline, "the container never served version 2"
        assert set(statuses) == {200}, (statuses, sorted(set(load.errors))[:5])
        assert len(in_window) > 100, len(in_window)
        assert code == 0
