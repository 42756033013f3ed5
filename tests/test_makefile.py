"""``make run``: the port checked before anything else, and no training or export again while
the run and its export are newer than what made them. Real ``make``: ``-n`` prints what it
would run, from the files' times, without running it."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from tests.conftest import REPO
from tests.serving.conftest import free_port


def make(*args: str, dry_run: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", *(["-n"] if dry_run else []), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def steps(result: subprocess.CompletedProcess) -> list[str]:
    """The imgclf commands in make's plan (the environment's own steps left out)."""
    assert result.returncode == 0, result.stderr
    return [line.split()[1] for line in result.stdout.splitlines() if "bin/imgclf " in line]


def test_make_run_trains_and_exports_once(tmp_path):
    where = [f"RUN_DIR={tmp_path}/run", f"REPOSITORY={tmp_path}/repository", "PORT=3999"]
    assert steps(make("run", *where)) == ["train", "export", "serve"]  # a fresh clone
    (tmp_path / "run").mkdir()
    (tmp_path / "run/metrics.json").write_text("{}")  # what a finished `imgclf train` leaves
    assert steps(make("run", *where)) == ["export", "serve"]
    (tmp_path / "repository/.make").mkdir(parents=True)
    later = time.time() + 1
    (tmp_path / "repository/.make/digits.exported").touch()
    os.utime(tmp_path / "repository/.make/digits.exported", (later, later))
    assert steps(make("run", *where)) == ["serve"], (
        "make run would train or export again although nothing changed (if .venv is older "
        "than pyproject.toml here, `make venv` first)"
    )
    assert steps(make("train", *where)) == ["train"]  # asked for, it retrains


def test_make_run_checks_its_port_before_training(tmp_path):
    port = free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        result = make(
            "run", f"RUN_DIR={tmp_path}/run", f"REPOSITORY={tmp_path}/repository",
            f"PORT={port}", dry_run=False, timeout=120,
        )  # fmt: skip
    assert result.returncode != 0
    assert f"error: cannot listen on 127.0.0.1:{port} (Address already in use)" in result.stderr
    assert not Path(tmp_path / "run").exists()  # nothing trained
