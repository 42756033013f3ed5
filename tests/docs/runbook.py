"""Run a docs page's command blocks as written, in a scratch copy of the repository in the
state the page says it starts from.

Every fenced ``bash`` or ``python`` block of the README and of ``docs/`` carries a marker on
the line before it:

- ``<!-- docs-test: run -->``: the page's test (``tests/docs/test_pages.py``) runs it;
- ``<!-- docs-test: skip: WHY -->``: it does not run in the tests (no Docker, GPU, cluster
  or network here; or minutes of training that another test spends), and WHY says so.

A command runs with ``bash -c`` in the scratch folder, from its first line to its last
(backslash continuations joined), and must exit 0, or the status its comment names (``exit
3``). What is substituted, all of it here: the ports 3000 to 3003 and 8081 by free ports, in the
commands and in the scrape configuration, so that the tests can run side by side; ``imgclf
serve``, a foreground command, is started in the background until ready, and so is
``prometheus``, on a free port; and ``imgclf train --dataset digits --output RUN [--force]``
is the session's cached digits run copied to RUN (that command itself runs as written, for
minutes, in ``tests/docs/test_readme.py``), and, in the page tests, ``imgclf export`` of such a
copy is that run's export from the model cache published as the next version (the README's
export runs as written). Servers poll their versions every 0.2 s rather than
2, so that a page's release reaches them sooner, and run one worker with no drain window: no
page shows either, and the suite is shorter by a worker's start and 5 s per server.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.conftest import IMGCLF, REPO
from tests.serving.conftest import free_late_port, free_port, wait_ready

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARKER = re.compile(r"<!-- docs-test: (run|skip: (?P<why>.+?)) -->")
FENCE = re.compile(r"^```(bash|python)\s*$")
EXPECTED_EXIT = re.compile(r"#.*\bexit (\d+)")
#: HTTP ports the pages use, and the gRPC port (KServe's, 8081).
GRPC_PORT = "8081"
DOCUMENTED_PORTS = ("3000", "3001", "3002", "3003", GRPC_PORT)


def wait_for_200(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not 200 after {timeout} s")


@dataclass
class Block:
    """A fenced code block of a page: where it is, its language, its text, its marker."""

    page: Path
    line: int
    language: str
    text: str
    marker: str | None  # "run", "skip: why", or None when the page forgot it

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"

    def commands(self) -> list[str]:
        """Its shell commands, continuations joined, comment lines dropped."""
        joined = self.text.replace("\\\n", " ")
        lines = [line.strip() for line in joined.splitlines()]
        return [line for line in lines if line and not line.startswith("#")]


def blocks(page: Path) -> list[Block]:
    """Every fenced bash or python block of ``page``, with the marker above it (if any)."""
    found = []
    lines = page.read_text().splitlines()
    inside = None
    for number, line in enumerate(lines, start=1):
        if inside is not None:
            if line.startswith("```"):
                found.append(inside)
                inside = None
            else:
                inside.text += line + "\n"
            continue
        fence = FENCE.match(line)
        if fence:
            above = next((text for text in reversed(lines[: number - 1]) if text.strip()), "")
            marker = MARKER.search(above)
            inside = Block(page, number, fence.group(1), "", marker and marker.group(1))
    return found


def page_blocks(name: str, marker: str = "run") -> list[Block]:
    """The blocks of ``docs/name`` (or the README) marked ``marker``."""
    page = REPO / name
    return [block for block in blocks(page) if block.marker == marker]


@dataclass
class Scratch:
    """A folder laid out as a clone of the repository after ``make run``: ``runs/digits``
    trained, ``model_repository/digits/1`` published, ``examples/``, ``.venv`` (linked), and
    the digits in the data home, as ``imgclf train --dataset digits`` leaves them."""

    root: Path
    digits_run: Path
    ports: dict[str, str] = field(default_factory=dict)
    servers: list[subprocess.Popen] = field(default_factory=list)
    #: The folders here that hold a copy of the session's digits run.
    digits_copies: set[Path] = field(default_factory=set)
    #: The real export of the digits run, without and with ``--int8``, where a test hands
    #: them over (the page tests; not the README's, whose export runs as written).
    cached_exports: dict[bool, Callable[[], Path]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    prometheus_url: str = ""

    @classmethod
    def after_make_run(cls, root: Path, digits_home: Path, digits_run: Path, digits_model: Path):
        shutil.copytree(REPO / "examples", root / "examples")
        shutil.copytree(REPO / "monitoring", root / "monitoring")
        (root / ".venv").symlink_to(Path(IMGCLF).parents[1])
        shutil.copytree(digits_run, root / "runs" / "digits")
        shutil.copytree(digits_model, root / "model_repository" / "digits" / "1")
        home = root / "home"
        (home / ".cache").mkdir(parents=True)
        (home / ".cache" / "imgclf").symlink_to(digits_home)
        scratch = cls(root, digits_run)
        scratch.digits_copies.add(root / "runs" / "digits")
        scratch.ports = {
            port: str(free_late_port() if port == GRPC_PORT else free_port())
            for port in DOCUMENTED_PORTS
        }
        # The port in the repository's files too: Prometheus's scrape target, for one.
        scrape = root / "monitoring" / "prometheus" / "prometheus.yml"
        scrape.write_text(scratch.as_here(scrape.read_text()))
        scratch.env = {
            **os.environ,
            "HOME": str(home),
            "BENTOML_HOME": tempfile.mkdtemp(prefix="imgclf-docs-"),
            "TF_CPP_MIN_LOG_LEVEL": "3",
            "IMGCLF_VERSION_POLL_S": "0.2",  # the page's switches land sooner
            # What the pages do not show, made cheaper: one worker per server (a worker's
            # start is 3-4 s of CPU), and a stop without the drain window (5 s each; the
            # drain has tests of its own, tests/serving/web/test_drain.py).
            "IMGCLF_WORKERS": "1",
            "IMGCLF_DRAIN_WINDOW_S": "0",
            "PATH": f"{root / '.venv' / 'bin'}:{os.environ['PATH']}",
        }
        return scratch

    def url(self, port: str = "3000") -> str:
        return f"http://127.0.0.1:{self.ports[port]}"

    def as_here(self, command: str) -> str:
        for documented, free in self.ports.items():
            command = re.sub(rf"(?<!\d){documented}(?!\d)", free, command)
        return command

    def run(self, command: str, *, expect: int | None = None, timeout: float = 300) -> str:
        """Run one documented command; its standard output (the server's start, for
        ``imgclf serve``). Fails with the command and its output unless it exits as the
        page says."""
        if expect is None:
            said = EXPECTED_EXIT.search(command)
            expect = int(said.group(1)) if said else 0
        here = self.as_here(command)
        words = shlex.split(here, comments=True)
        program = [Path(words[0]).name, *words[1:]] if words else []
        if program[:2] == ["imgclf", "serve"] and expect == 0:
            return self.serve(shlex.join(words))
        if program[:1] == ["prometheus"]:
            return self.prometheus(shlex.join(words))
        if program[:5] == ["imgclf", "train", "--dataset", "digits", "--output"] and set(
            program[6:]
        ) <= {"--force"}:
            output = self.root / program[5]
            shutil.rmtree(output, ignore_errors=True)
            shutil.copytree(self.digits_run, output)
            self.digits_copies.add(output)
            return ""
        if program[:2] == ["imgclf", "export"] and expect == 0:
            published = self.cached_export(program[2:])
            if published is not None:
                return published
        result = subprocess.run(
            ["bash", "-c", here],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == expect, (
            f"{command}\nexit {result.returncode}, the page says {expect}\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        )
        return result.stdout

    def cached_export(self, arguments: list[str]) -> str | None:
        """``imgclf export RUN --repository R --name N [--int8] [--no-register]`` of a copy
        of the digits run: the real export of that run (the session's model cache) published
        as the next version of ``R/N``, as the command publishes, and registered by the real
        ``imgclf register`` unless ``--no-register``. The arguments are parsed by the real
        command's parser, so that a mistyped option still fails; None for any other export,
        which runs as written."""
        import typer.main

        from imgclf.cli import app
        from tests.serving.variants import publish_variant
        from training.publish import choose_version

        command = typer.main.get_command(app).commands["export"]
        given = command.make_context("export", list(arguments)).params
        defaults = command.make_context("export", ["RUN"]).params
        handled = {"run_dir", "repository", "name", "int8", "register"}
        run = self.root / given["run_dir"]
        if (
            any(given[key] != defaults[key] for key in defaults.keys() - handled)
            or run not in self.digits_copies
            or given["name"] is None
            or not self.cached_exports
        ):
            return None
        model_root = self.root / given["repository"] / given["name"]
        version = choose_version(model_root, None, force=False)
        published = publish_variant(
            self.cached_exports[given["int8"]](), version, into=model_root,
            name=given["name"], keep_int8=given["int8"],
        )  # fmt: skip
        where = published.relative_to(self.root)
        said = f"published {where} (the digits run's export, from the model cache)\n"
        if given["register"]:
            said += self.run(f"imgclf register {where}")
        return said

    def run_blocks(self, found: list[Block]) -> dict[str, str]:
        """Every command of ``found`` in order; each command's output by its text."""
        outputs = {}
        for block in found:
            assert block.language == "bash", block.where
            for command in block.commands():
                outputs[command] = self.run(command)
        return outputs

    def serve(self, command: str) -> str:
        port = re.search(r"--port (\d+)", command)
        url = f"http://127.0.0.1:{port.group(1) if port else self.ports['3000']}"
        if not port:
            command += f" --port {self.ports['3000']}"  # the default port, made free
        with socket.socket() as probe:  # an earlier server's port: this one cannot listen
            taken = probe.connect_ex(("127.0.0.1", int(url.rsplit(":", 1)[1]))) == 0
        assert not taken, f"{command}: its port is taken by a server the page started before"
        return self.background(command, url + "/readyz")

    def background(self, command: str, ready_url: str) -> str:
        """Start a command that runs until stopped; wait until ``ready_url`` answers 200
        (and, for a server, every worker is ready)."""
        log = open(self.root / f"background-{len(self.servers)}.log", "w+")  # noqa: SIM115
        server = subprocess.Popen(
            ["bash", "-c", f"exec {command}"],
            cwd=self.root,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.servers.append(server)
        try:
            if ready_url.endswith("/readyz"):
                wait_ready(ready_url.removesuffix("/readyz"), server, timeout=120)
            else:
                wait_for_200(ready_url, server, timeout=60)
        except (RuntimeError, TimeoutError) as error:
            log.seek(0)
            raise AssertionError(f"{command}: {error}\n{log.read()[-3000:]}") from None
        return ""

    def prometheus(self, command: str) -> str:
        """Prometheus as the page starts it, on a free port and in this scratch folder."""
        command = command.replace("/tmp/prometheus", str(self.root / "prometheus-data"))
        self.prometheus_url = f"http://127.0.0.1:{free_port()}"
        command += f" --web.listen-address={self.prometheus_url.removeprefix('http://')}"
        return self.background(command, self.prometheus_url + "/-/ready")

    def stop(self) -> None:
        for server in self.servers:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
        for server in self.servers:
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        self.servers.clear()


#: What ``make run`` ends with (the Makefile's ``serve`` line, at its defaults).
MAKE_RUN_SERVES = "imgclf serve --model model_repository/digits --port 3000"


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
