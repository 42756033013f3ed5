"""Start-up (readiness, refusals), and the Bento that ``bentoml build`` makes."""

from __future__ import annotations

import os
import subprocess

import httpx
import pytest
import yaml

from tests.conftest import REPO, assert_one_line_error, run_cli


def test_service_is_live_but_unready_until_warm(service_module, monkeypatch):
    """Warm-up is held back by an event, so the not-yet-ready window is certain; /readyz
    says why it is not ready."""
    import threading
    import time

    from starlette.testclient import TestClient

    from serving.core.runtime import ClassifierRuntime

    gate = threading.Event()
    real_warm_up = ClassifierRuntime.warm_up

    def held_warm_up(self, sizes=None):
        gate.wait(30)
        real_warm_up(self, sizes)

    monkeypatch.setattr(ClassifierRuntime, "warm_up", held_warm_up)
    # BentoML's own HTTP metrics are process-global and the in-process ImageClassifier app has
    # registered them already; this second app is built with them off.
    from _bentoml_impl.server.app import ServiceAppFactory

    service_module.ImageClassifier.inject_config()
    app = ServiceAppFactory(service_module.ImageClassifier, is_main=True, enable_metrics=False)()
    # One service instance per process is the rule: give the routes back to the session's.
    import importlib

    current = importlib.import_module("_bentoml_sdk.service")  # the module, not the decorator
    session_service = current._current_service  # None when no other test started one
    try:
        with TestClient(app) as service:
            assert service.get("/livez").status_code == 200
            unready = service.get("/readyz")
            assert unready.status_code == 503
            assert unready.json()["status"] == "warming"
            assert "batch sizes 1, 2, 4, 8, 16, 32, 64" in unready.json()["error"]
            gate.set()
            deadline = time.time() + 30
            while (ready := service.get("/readyz")).status_code != 200:
                assert time.time() < deadline, "never became ready"
                time.sleep(0.02)
            assert ready.json() == {"status": "ready"}
    finally:
        current.set_current_service(session_service)


@pytest.mark.serial  # the 24 uploads must be in flight together within 1.5 s
def test_sigterm_drains_requests_in_flight(published_model):
    """24 slow /predict_batch calls (two 12-megapixel JPEGs each, uploaded over about two
    seconds, as a phone on a poor network would) are in flight when the server's process
    group gets SIGTERM: /readyz turns 503 at once, every call is answered 200, then the
    server exits."""
    from tests.serving.conftest import Server
    from tests.serving.load import SlowUploads

    server = Server(published_model, env={"IMGCLF_DRAIN_WINDOW_S": "1"}, args=("--workers", "1"))
    try:
        server.wait_ready()
        with SlowUploads(server.url) as uploads:
            server.signal()
            answers = uploads.answers()
        assert [a.status_code for a in answers] == [200] * 24, [a.text for a in answers]
        assert all(len(a.json()) == 2 for a in answers)
        # Once the last answer has left the server, the drain ends and the worker stops
        # listening: probes sent after that (while the client reads the answer) may find no
        # server. Before that, every probe is a 503.
        readiness = uploads.readiness
        while readiness and readiness[-1] == 0:
            readiness.pop()
        assert readiness and set(readiness) == {503}, readiness
        server.process.wait(timeout=60)
        log = server.output()
        assert "finishing what is in flight (24 request(s) now)" in log, log[-2000:]
        assert "drain complete" in log, log[-2000:]
    finally:
        server.stop()


def test_real_server_becomes_ready_and_answers(server):
    assert httpx.get(server.url + "/readyz").status_code == 200
    assert httpx.get(server.url + "/livez").status_code == 200
    response = httpx.post(
        server.url + "/predict", content=b"\x89PNG\r\n\x1a\n", headers={"Content-Type": "image/png"}
    )
    assert response.status_code == 400  # answering, and answering properly


def test_serve_refuses_unusable_models_in_one_line(tmp_path, published_model):
    assert_one_line_error(
        run_cli("serve", "--model", str(tmp_path / "missing"), timeout=60), "does not exist"
    )
    assert_one_line_error(
        run_cli("serve", "--model", str(published_model), "--provider", "cuda", timeout=60),
        "provider cuda requested",
    )
    # A bad option is named as typed; a bad variable by its name.
    assert_one_line_error(
        run_cli("serve", "--model", str(published_model), "--precision", "fp8", timeout=60),
        "invalid --precision",
    )
    assert_one_line_error(
        run_cli(
            "serve", "--model", str(published_model), env={"IMGCLF_PRECISION": "fp8"}, timeout=60
        ),
        "invalid IMGCLF_PRECISION",
    )
    # IMGCLF_MODEL_DIR (set for the in-process service) would win over --bento-model.
    assert_one_line_error(
        run_cli("serve", "--bento-model", "nothere:1", env={"IMGCLF_MODEL_DIR": ""}, timeout=60),
        "not in the local store",
    )


def test_bentoml_build_packages_serving_code_and_no_tensorflow(tmp_path, published_model):
    from serving.registry import register

    tag = register(published_model)
    bentofile = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    bentofile["models"] = [tag]
    for setting in bentofile["envs"]:
        if setting["name"] == "IMGCLF_BENTO_MODEL":
            setting["value"] = tag
    variant = tmp_path / "bentofile.yaml"
    variant.write_text(yaml.safe_dump(bentofile))
    result = subprocess.run(
        [
            str(REPO / ".venv" / "bin" / "bentoml"),
            "build",
            "-f",
            str(variant),
            "--output",
            "tag",
            str(REPO),
        ],
        capture_output=True,
        text=True,
        # As a user builds: the service names the stored model (the in-process tests'
        # IMGCLF_MODEL_DIR, when this process has set it, would hide a missing one).
        env={
            **{k: v for k, v in os.environ.items() if k != "IMGCLF_MODEL_DIR"},
            "IMGCLF_BENTO_MODEL": tag,
        },
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import bentoml

    bento_tag = result.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    bento = bentoml.get(bento_tag)
    root = bento.path_of("/")
    with open(os.path.join(root, "env/python/requirements.txt")) as handle:
        requirements = handle.read().lower()
    for forbidden in ("tensorflow", "keras", "tf2onnx", "scikit-learn", "matplotlib"):
        assert forbidden not in requirements, forbidden
    for needed in ("onnxruntime==", "bentoml==", "prometheus-client==", "pillow==", "numpy=="):
        assert needed in requirements, needed
    sources = {
        os.path.relpath(os.path.join(folder, name), os.path.join(root, "src"))
        for folder, _, names in os.walk(os.path.join(root, "src"))
        for name in names
    }
    # Every serving module, in every sub-package, travels with the Bento.
    serving_modules = {str(p.relative_to(REPO)) for p in (REPO / "serving").rglob("*.py")}
    assert serving_modules <= sources, serving_modules - sources
    assert {"serving/service.py", "serving/core/runtime.py"} <= sources
    assert not any(s.startswith(("training/", "imgclf/", "tests/")) for s in sources), sources
    with open(os.path.join(root, "bento.yaml")) as handle:
        info = yaml.safe_load(handle)
    assert [m["tag"] for m in info["models"]] == [tag]
    assert {e["name"]: e["value"] for e in info["envs"]}["IMGCLF_PROVIDER"] == "cpu"


def test_gpu_bentofile_swaps_onnxruntime_for_onnxruntime_gpu():
    gpu = yaml.safe_load((REPO / "bentofile.gpu.yaml").read_text())
    cpu = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    packages = gpu["python"]["packages"]
    assert any(p.startswith("onnxruntime-gpu[cuda,cudnn]==") for p in packages)
    assert not any(p.startswith("onnxruntime==") for p in packages)
    assert "cuda_version" not in gpu.get("docker", {})
    assert gpu["service"] == cpu["service"] and gpu["include"] == cpu["include"]


@pytest.mark.parametrize("bentofile", ["bentofile.yaml", "bentofile.gpu.yaml"])
def test_bentofiles_pin_what_pyproject_pins(bentofile):
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    extra = "gpu" if "gpu" in bentofile else "serve"
    pinned = set(project["project"]["optional-dependencies"][extra])
    packages = set(yaml.safe_load((REPO / bentofile).read_text())["python"]["packages"])
    assert packages <= pinned, packages - pinned
