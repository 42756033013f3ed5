"""``imgclf score --engine ray`` on a real one-node Ray cluster (started here): the same rows
as the local engine, broken files as error rows, a killed job resumed, a killed actor
retried, no model copy left in the temporary folder, no Ray notice on the terminal, and one
line when Ray is not installed."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from serving.batch.job import score
from serving.core.runtime import ClassifierRuntime
from tests.conftest import IMGCLF, REPO, assert_one_line_error, run_cli
from tests.data import make_image_folder, write_large_photos
from tests.model_cache import cached
from tests.serving.conftest import free_port
from tests.serving.web.test_hostile import ACCEPTED, CORPUS, REFUSED

pytestmark = pytest.mark.timeout(180)
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
RAY = str(Path(sys.executable).with_name("ray"))


ADDRESS_FLAGS = ("--address=", "--gcs-address=")


class RayCluster:
    """A cluster that ``ray start --head`` left on this machine, told apart from any other
    there (a job's own local cluster, the docs page's, run by the suite's other process): by
    its session folder and its address in its processes' command lines, and the children of
    those (its workers and actors). ``ray stop`` would stop every cluster on the machine, and
    a kill by process name would reach another cluster's actors: both made the docs page's
    Ray job fail when it ran beside these tests."""

    def __init__(self, port: int) -> None:
        self.address = f"127.0.0.1:{port}"
        self.port = port
        (gcs,) = [p for p in self._all() if f"--gcs_server_port={port}" in p.info["cmdline"]]
        (session,) = [w for w in gcs.info["cmdline"] if w.startswith("--session-dir=")]
        self.session = Path(session.split("=", 1)[1]).name

    @staticmethod
    def _all() -> list[psutil.Process]:
        """Every process, its command line as a list (empty where it cannot be read)."""
        found = list(psutil.process_iter(["cmdline"]))
        for process in found:
            process.info["cmdline"] = process.info["cmdline"] or []
        return found

    def _started_by_it(self, words: list[str]) -> bool:
        return any(
            self.session in word
            or (word.startswith(ADDRESS_FLAGS) and word.endswith(f":{self.port}"))
            for word in words
        )

    def processes(self) -> list[psutil.Process]:
        found = {}
        for process in self._all():
            if self._started_by_it(process.info["cmdline"]):
                found[process.pid] = process
                with contextlib.suppress(psutil.Error):
                    found |= {child.pid: child for child in process.children(recursive=True)}
        return list(found.values())

    def actors(self, *names: str) -> list[psutil.Process]:
        """Its actor processes whose title holds every one of ``names``."""
        found = []
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                if any(all(name in word for name in names) for word in process.cmdline()):
                    found.append(process)
        return found

    def stop(self) -> None:
        """As ``ray stop --force`` does, SIGKILL (some of Ray's processes outwait a SIGTERM
        by 15 s), to this cluster's processes alone."""
        processes = self.processes()
        for process in processes:
            with contextlib.suppress(psutil.Error):
                process.kill()
        _, alive = psutil.wait_procs(processes, timeout=10)
        assert not alive, [process.pid for process in alive]


@pytest.fixture(scope="module")
def cluster():
    """``ray start --head`` with 4 logical CPUs (on 2 cores an actor pool that takes every
    CPU would starve Ray Data's own tasks); its processes, and only its, stopped afterwards."""
    port = free_port()
    env = {**os.environ, **RAY_ENV}
    started = subprocess.run(
        [RAY, "start", "--head", f"--port={port}", "--num-cpus=4", "--include-dashboard=false"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert started.returncode == 0, started.stderr[-2000:]
    running = RayCluster(port)
    yield running
    running.stop()


def read_rows(output: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return sorted(pq.read_table(output).to_pylist(), key=lambda row: row["path"])


def score_with_ray(cluster: RayCluster, inputs: Path, model: Path, output: Path, *extra: str):
    return run_cli(
        "score",
        str(inputs),
        "--model",
        str(model),
        "--output",
        str(output),
        "--engine",
        "ray",
        "--address",
        cluster.address,
        "--no-progress",
        *extra,
        env=RAY_ENV,
        timeout=170,
    )


def test_ray_and_local_engines_write_the_same_rows(tmp_path, published_model, cluster):
    folder = make_image_folder(tmp_path / "images", 6)
    for name in [*ACCEPTED, *list(REFUSED)[:6]]:
        shutil.copy(CORPUS / name, folder / name)
    local = tmp_path / "local.parquet"
    score(folder, ClassifierRuntime(published_model, provider="cpu"), local, progress=False)
    ray_output = tmp_path / "ray.parquet"
    result = score_with_ray(cluster, folder, published_model, ray_output, "--batch-size", "4")
    assert result.returncode == 4, result.stderr[-3000:]  # finished, some files unreadable
    expected, actual = read_rows(local), read_rows(ray_output)
    assert [row["path"] for row in actual] == [row["path"] for row in expected]
    assert sum(1 for row in actual if row["error"]) == 6
    for mine, theirs in zip(actual, expected, strict=True):
        assert (mine["label"], mine["error"], mine["top_k_labels"]) == (
            theirs["label"],
            theirs["error"],
            theirs["top_k_labels"],
        )
        if theirs["score"] is not None:
            assert mine["score"] == pytest.approx(theirs["score"], abs=1e-6)
    assert (tmp_path / "ray.parquet.drift.json").is_file()


#: A line of imgclf's own logging (``imgclf/app.py``); a Ray logger's line, propagated to the
#: root logger, names a ``ray`` logger and is not one.
IMGCLF_LOG_LINE = re.compile(r"\d\d:\d\d:\d\d [A-Z]+ (?!ray\b)[\w.]+: ")


def test_a_ray_job_prints_no_ray_notice(tmp_path, published_model, cluster):
    """Before, stderr had Ray's ``E`` line about actor constructor arguments in the object
    store, Ray Data's "Progress bars disabled" warning, and its UserWarning about a pool of
    more actors than blocks (3 actors on this 4-CPU cluster, 1 block of 3 images)."""
    folder = make_image_folder(tmp_path / "images", 1)
    result = score_with_ray(cluster, folder, published_model, tmp_path / "scores.csv")
    assert result.returncode == 0, result.stderr[-3000:]
    notices = [line for line in result.stderr.splitlines() if not IMGCLF_LOG_LINE.match(line)]
    assert notices == [], result.stderr


@pytest.fixture
def short_temporary_folder():
    """A fresh folder with a short path: Ray's sockets live under it, and a Unix socket's path
    has at most 107 characters (pytest's ``tmp_path`` is too long)."""
    folder = Path(tempfile.mkdtemp(prefix="imgclf-test-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_ray_job_leaves_no_model_copy_in_the_temporary_folder(
    tmp_path, published_model, short_temporary_folder
):
    """As docs/batch-scoring.md runs it first: no ``--address``, so the job starts its own
    cluster, whose actors inherit the command's TMPDIR. Before, each actor left its copy of
    the model there (``imgclf-model-*``), for every job."""
    folder = make_image_folder(tmp_path / "images", 2)
    result = run_cli(
        "score",
        str(folder),
        "--model",
        str(published_model),
        "--output",
        str(tmp_path / "scores.csv"),
        "--engine",
        "ray",
        "--no-progress",
        env={**RAY_ENV, "TMPDIR": str(short_temporary_folder)},
        timeout=170,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Ray's session folder is there: the cluster, and so its actors, used this TMPDIR.
    assert (short_temporary_folder / "ray").is_dir()
    left = sorted(path.name for path in short_temporary_folder.glob("imgclf-*"))
    assert left == []


def test_without_address_a_job_starts_its_own_cluster_beside_a_running_one(
    tmp_path, published_model, cluster
):
    """With a cluster that `ray start` left on the machine, a bare ray.init() joined it and
    refused our CPU count: a traceback, exit 1 (two tests at once met it)."""
    folder = make_image_folder(tmp_path / "images", 2)
    output = tmp_path / "scores.parquet"
    result = run_cli(
        *("score", str(folder), "--model", str(published_model), "--output", str(output)),
        *("--engine", "ray", "--no-progress"),
        env=RAY_ENV,
        timeout=170,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(read_rows(output)) == len(list(folder.rglob("*.*")))


@pytest.fixture(scope="module")
def large_images() -> Path:
    """240 digit photos of 1200x1200 pixels: slow enough to decode to interrupt a job."""
    build = lambda folder: write_large_photos(folder / "photos", 80)  # noqa: E731
    return cached("large-photos", {"count_per_class": 80}, build) / "photos"


def start_job(cluster: RayCluster, inputs, model, output) -> subprocess.Popen:
    return subprocess.Popen(
        [
            *(IMGCLF, "score", str(inputs), "--model", str(model), "--output", str(output)),
            *("--engine", "ray", "--address", cluster.address),
            *("--actors", "1", "--batch-size", "8"),
            "--no-progress",
        ],
        env={**os.environ, **RAY_ENV},
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def wait_for_parts(output: Path, job: subprocess.Popen, count: int = 2) -> None:
    deadline = time.time() + 120
    while len(list(output.glob("part-*.parquet"))) < count:
        assert job.poll() is None, job.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no rows were written"
        time.sleep(0.05)


def test_a_killed_job_resumes_with_every_path_exactly_once(
    tmp_path, published_model, cluster, large_images
):
    output = tmp_path / "scores.parquet"
    job = start_job(cluster, large_images, published_model, output)
    wait_for_parts(output, job)
    os.killpg(job.pid, signal.SIGKILL)  # the driver dies mid-job
    job.wait(timeout=30)
    partial = len(read_rows(output))
    total = len(list(large_images.iterdir()))
    assert 0 < partial < total, "the job was not interrupted half-way"
    resumed = score_with_ray(cluster, large_images, published_model, output, "--actors", "1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{partial} skipped" in resumed.stdout
    paths = [row["path"] for row in read_rows(output)]
    assert len(paths) == len(set(paths)) == total
    assert not list(output.glob(".part-*"))


def test_an_actor_killed_mid_job_is_retried_and_nothing_is_lost(
    tmp_path, published_model, cluster, large_images
):
    output = tmp_path / "scores.parquet"
    job = start_job(cluster, large_images, published_model, output)
    wait_for_parts(output, job, count=1)
    actors = cluster.actors("MapWorker", "ScoreBatch")
    assert actors, "no scoring actor found"
    for actor in actors:
        actor.kill()
    _, errors = job.communicate(timeout=170)
    assert job.returncode == 0, errors.decode()[-3000:]
    rows = read_rows(output)
    assert len(rows) == len({row["path"] for row in rows}) == len(list(large_images.iterdir()))
    assert not any(row["error"] for row in rows)


def test_gpu_actors_on_a_cluster_without_a_gpu_are_refused_at_once(
    tmp_path, published_model, cluster
):
    """Before, the job waited for a GPU that never comes (Ray's own warning after 60 s)."""
    folder = make_image_folder(tmp_path / "images", 1)
    output = tmp_path / "gpu.csv"
    result = score_with_ray(cluster, folder, published_model, output, "--gpus-per-actor", "1")
    assert_one_line_error(result, "--gpus-per-actor 1 but the Ray cluster has 0 GPU(s)")
    assert not output.exists()


def test_ray_engine_without_ray_installed_is_one_line(tmp_path, published_model):
    shim = tmp_path / "no_ray" / "ray"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    result = run_cli(
        "score",
        str(CORPUS),
        "--model",
        str(published_model),
        "--output",
        str(tmp_path / "x.parquet"),
        "--engine",
        "ray",
        env={"PYTHONPATH": str(shim.parent)},
        timeout=120,
    )
    assert_one_line_error(result, "--engine ray needs Ray Data")
    assert not (tmp_path / "x.parquet").exists()
