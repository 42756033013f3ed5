"""The README's "one command per task" block, run as written (a shorter training run, a free
port instead of 3000) in a scratch folder, so that none of its commands rots."""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import subprocess
import tempfile

import pytest

from tests.conftest import IMGCLF, REPO
from tests.serving.conftest import free_port, wait_ready

pytestmark = pytest.mark.slow


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- readme-commands:start -->")[1].split("<!-- readme-commands:end -->")[0]
    lines = [line.split("  #")[0].strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("```")]


def test_the_block_covers_every_task():
    verbs = [shlex.split(line)[:2] for line in readme_commands()]
    assert [v[1] for v in verbs if v[0] == "imgclf"] == [
        "train", "export", "serve", "score", "evaluate"
    ]  # fmt: skip


def test_readme_commands_run_as_written(tmp_path, digits_home):
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    port = str(free_port())
    env = {
        **os.environ,
        "IMGCLF_DATA_HOME": str(digits_home),
        "BENTOML_HOME": tempfile.mkdtemp(),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PATH": f"{os.path.dirname(IMGCLF)}:{os.environ['PATH']}",
    }
    server = None
    outputs = {}
    try:
        for line in readme_commands():
            argv = shlex.split(line.replace("3000", port))
            if argv[:2] == ["imgclf", "train"]:
                argv += ["--epochs", "6"]  # the one change: a shorter run
            if argv[:2] == ["imgclf", "serve"]:
                log = open(tmp_path / "serve.log", "w+")  # noqa: SIM115
                server = subprocess.Popen(
                    argv, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
                wait_ready(f"http://127.0.0.1:{port}", server, timeout=120)
                continue
            result = subprocess.run(
                argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
            )
            assert result.returncode == 0, f"{line}\n{result.stderr[-2000:]}"
            outputs[argv[0] + " " + argv[-1]] = result.stdout
    finally:
        if server is not None:
            os.killpg(server.pid, 15)
            server.wait(timeout=60)
    answer = json.loads(outputs[f"curl http://127.0.0.1:{port}/predict"])
    assert answer["label"] == "3" and answer["model_version"] == 1  # as the README says
    assert "imgclf_requests_total" in outputs[f"curl http://127.0.0.1:{port}/metrics"]
    with open(tmp_path / "scores.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["label"] for row in rows) == ["0", "3", "7"]
    assert (tmp_path / "runs/digits/eval/evaluation.json").exists()
