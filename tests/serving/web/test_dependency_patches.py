"""Each change the service makes to a dependency, pinned: an upstream rename, or a change in
how upstream reads the setting, would make the change silently do nothing.

- ``serving/web/requests.py`` sets Starlette's ``MultiPartParser.spool_max_size``, so that an
  uploaded file part over 1 MiB stays in memory instead of being spooled to disk;
- ``serving/web/http_limits.py``'s ``install`` points uvicorn's ``"auto"`` (and
  ``"httptools"``) HTTP protocol at its bounded subclass of ``HttpToolsProtocol``, which
  also writes each answer's head together with its body;
- ``serving/web/supervision.py`` removes ``BENTOML_CONTAINERIZED``, which turns BentoML's
  replacement of dead workers off;
- ``serving/web/launch.py`` sets BentoML's ``prometheus_multiproc_dir`` to a folder of the
  server's own;
- ``serving/batch/ray_engine.py`` sets ``RAY_USAGE_STATS_ENABLED=0`` before starting Ray.

Each test fails with its patch line commented out. The real servers that depend on them are
tested elsewhere (``test_hostile_callers.py``, ``test_drain.py``, ``test_several_servers.py``,
the container tests); these run in a second, without a server.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import textwrap

import pytest


def class_source(cls: type) -> ast.ClassDef:
    """The installed upstream source of ``cls``, parsed."""
    (node,) = ast.parse(textwrap.dedent(inspect.getsource(cls))).body
    return node


def self_attributes(node: ast.AST, context: type[ast.expr_context]) -> set[str]:
    """The ``self.NAME`` attributes that ``node`` reads (ast.Load) or writes (ast.Store)."""
    return {
        each.attr
        for each in ast.walk(node)
        if isinstance(each, ast.Attribute)
        and isinstance(each.value, ast.Name)
        and each.value.id == "self"
        and isinstance(each.ctx, context)
    }


def method(cls_node: ast.ClassDef, name: str) -> ast.FunctionDef:
    (found,) = [each for each in cls_node.body if getattr(each, "name", None) == name]
    return found


# Starlette: multipart file parts stay in memory


def upstream_spool_default() -> int:
    """``MultiPartParser.spool_max_size`` as Starlette's own code defines it (the class
    attribute the patch replaces), checking that its parser still reads that attribute."""
    from starlette.formparsers import MultiPartParser

    parser = class_source(MultiPartParser)
    (value,) = [
        each.value
        for each in parser.body
        if isinstance(each, ast.Assign)
        and [target.id for target in each.targets if isinstance(target, ast.Name)]
        == ["spool_max_size"]
    ]
    assert "spool_max_size" in self_attributes(parser, ast.Load), (
        "Starlette's MultiPartParser no longer reads self.spool_max_size"
    )
    return eval(ast.unparse(value), {"__builtins__": {}})  # a constant such as 1024 * 1024


BOUNDARY = "imgclf-pinned-boundary"


def multipart_body(field: str, data: bytes) -> bytes:
    return (
        (
            f"--{BOUNDARY}\r\n"
            f'Content-Disposition: form-data; name="{field}"; filename="photo.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


async def parsed_upload(body: bytes):
    """The uploaded file as Starlette's ``Request.form`` leaves it, read with the arguments
    ``serving/web/requests.py`` passes: its spooled file, whether it rolled over to disk and
    what it holds its bytes in (CPython's ``SpooledTemporaryFile._rolled`` and ``_file``: a
    ``BytesIO`` until it rolls over), and its bytes."""
    from starlette.requests import Request

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/predict",
        "query_string": b"",
        "headers": [
            (b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode()),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    chunks = [body[start : start + 64 * 1024] for start in range(0, len(body), 64 * 1024)]

    async def receive():
        if chunks:
            return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}
        return {"type": "http.disconnect"}

    async with Request(scope, receive).form(
        max_files=2, max_fields=16, max_part_size=64 * 1024
    ) as form:
        upload = form["image"]
        spooled = upload.file
        return spooled, spooled._rolled, spooled._file, await upload.read()


def test_a_file_part_over_starlettes_spool_size_stays_in_memory():
    import serving.web.requests  # noqa: F401  (the patch, at import)

    default = upstream_spool_default()
    data = os.urandom(2 * default)  # 2 MiB: Starlette alone would spool it to disk
    spooled, rolled, underlying, read = asyncio.run(parsed_upload(multipart_body("image", data)))
    assert isinstance(spooled, tempfile.SpooledTemporaryFile)
    assert rolled is False and isinstance(underlying, io.BytesIO), (
        f"a {len(data)}-byte part rolled over to {type(underlying).__name__}: "
        "MultiPartParser.spool_max_size no longer keeps parts in memory"
    )
    assert read == data


# uvicorn: the "auto" HTTP protocol is the bounded one


def upstream_protocol_table() -> dict[str, str]:
    """uvicorn's ``HTTP_PROTOCOLS`` as its own code defines it, checking that
    ``Config.load`` still resolves ``Config.http`` through that table."""
    from uvicorn import config

    tree = ast.parse(inspect.getsource(config))
    (table,) = [
        each.value
        for each in tree.body
        if isinstance(each, ast.AnnAssign | ast.Assign)
        and "HTTP_PROTOCOLS"
        in [t.id for t in getattr(each, "targets", [getattr(each, "target", None)])]
    ]
    load = method(class_source(config.Config), "load")
    reads = {each.id for each in ast.walk(load) if isinstance(each, ast.Name)}
    assert "HTTP_PROTOCOLS" in reads, "uvicorn's Config.load no longer reads HTTP_PROTOCOLS"
    return ast.literal_eval(table)


async def app(scope, receive, send):
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def installed(monkeypatch):
    """``http_limits.install`` run on uvicorn's own table (the service's import may have
    installed it already in this process), undone afterwards."""
    from uvicorn import config

    from serving.web import http_limits

    table = upstream_protocol_table()
    for key in ("auto", "httptools"):
        monkeypatch.setitem(config.HTTP_PROTOCOLS, key, table[key])
    monkeypatch.setattr(http_limits, "BoundedHttpToolsProtocol", None, raising=False)
    assert http_limits.install(1234, keep_alive_timeout_s=77, header_timeout_s=9.0)
    return http_limits


def test_uvicorn_resolves_auto_to_the_bounded_protocol(installed):
    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    assert inspect.signature(uvicorn.Config).parameters["http"].default == "auto"
    for http in ({}, {"http": "auto"}, {"http": "httptools"}):  # BentoML passes none
        config = uvicorn.Config(app, log_config=None, **http)
        config.load()
        bounded = config.http_protocol_class
        assert bounded is installed.BoundedHttpToolsProtocol, (http, bounded)
        assert issubclass(bounded, HttpToolsProtocol) and bounded.limit == 1234


def test_the_bounded_protocol_overrides_only_what_uvicorn_has(installed):
    """Its hooks override uvicorn's (a renamed hook would never be called), and its own
    helpers shadow nothing of uvicorn's."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    ours = {name for name in vars(installed.BoundedHttpToolsProtocol) if not name.startswith("__")}
    hooks = {name for name in ours if not name.startswith("_") and name != "limit"}
    assert "data_received" in hooks and "on_headers_complete" in hooks
    assert not [name for name in hooks if name not in vars(HttpToolsProtocol)]
    assert not [name for name in ours - hooks if hasattr(HttpToolsProtocol, name)]
    # What its code uses of uvicorn's, set in uvicorn's __init__ or connection_made:
    upstream = class_source(HttpToolsProtocol)
    written = self_attributes(method(upstream, "__init__"), ast.Store)
    written |= self_attributes(method(upstream, "connection_made"), ast.Store)
    assert {"loop", "transport", "timeout_keep_alive"} <= written
    armed = self_attributes(method(upstream, "on_response_complete"), ast.Load)
    assert "timeout_keep_alive" in armed, "uvicorn reads its keep-alive timeout elsewhere"


async def exchange(protocol_class, request: bytes) -> tuple[bytes, float | None]:
    """``request`` sent to ``protocol_class`` over a real socket pair: the first answer, and
    in how many seconds the keep-alive timer then armed would close the connection."""
    import uvicorn
    from uvicorn.server import ServerState

    loop = asyncio.get_running_loop()
    config = uvicorn.Config(app, log_config=None)
    config.load()
    ours, theirs = socket.socketpair()
    protocol = protocol_class(config=config, server_state=ServerState(), app_state={}, _loop=loop)
    await loop.connect_accepted_socket(lambda: protocol, ours)
    reader, writer = await asyncio.open_connection(sock=theirs)
    try:
        writer.write(request)
        answer = b""
        while True:  # one whole answer (its Content-Length), or until the server closes
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            if not chunk or (length and len(body) >= int(length[1])):
                break
        await asyncio.sleep(0.05)  # the response's end armed the keep-alive timer
        timer = protocol.timeout_keep_alive_task
        return answer, None if timer is None else timer.when() - loop.time()
    finally:
        writer.close()
        protocol.transport.close()
        await asyncio.sleep(0)


def test_the_bounded_protocol_refuses_a_long_head_and_keeps_idle_connections(installed):
    bounded = installed.BoundedHttpToolsProtocol
    small = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"
    answer, keep_alive = asyncio.run(exchange(bounded, small))
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok")
    assert keep_alive is not None and 70 < keep_alive <= 77, keep_alive  # uvicorn's is 5
    large = b"GET / HTTP/1.1\r\nhost: x\r\nx-padding: " + b"a" * 2000 + b"\r\n\r\n"
    answer, _ = asyncio.run(exchange(bounded, large))
    assert answer.startswith(b"HTTP/1.1 431"), answer[:80]


# BentoML: dead workers are replaced inside a container too


def first_call_line(function, name: str) -> int:
    """The line of ``function``'s first call of ``name`` (in upstream's installed source)."""
    calls = [
        each.lineno
        for each in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(function))))
        if isinstance(each, ast.Call) and getattr(each.func, "id", None) == name
    ]
    assert calls, f"{function.__qualname__} no longer calls {name}"
    return min(calls)


def test_a_server_marked_as_containerized_still_replaces_dead_workers(monkeypatch):
    from _bentoml_impl.server.serving import serve_http
    from bentoml import serving as bentoml_serving

    from serving.web.supervision import CONTAINER_VARIABLE, replace_dead_workers

    # The service's on_deployment hook, which removes the variable, runs before BentoML
    # makes the workers' watcher (which reads it, once per process).
    hook = first_call_line(serve_http, "server_on_deployment")
    assert hook < first_call_line(serve_http, "create_watcher")
    inside = bentoml_serving.running_inside_container
    monkeypatch.delenv("BENTOCLOUD_DEPLOYMENT_URL", raising=False)
    monkeypatch.setenv(CONTAINER_VARIABLE, "true")  # as BentoML's container images set it
    inside.cache_clear()
    try:
        assert inside(), f"BentoML no longer reads {CONTAINER_VARIABLE}"
        assert not bentoml_serving.create_watcher("probe", []).respawn
        inside.cache_clear()
        replace_dead_workers()
        assert bentoml_serving.create_watcher("probe", []).respawn
    finally:
        inside.cache_clear()


# BentoML: a Prometheus folder per server


#: ``launch.main()`` with BentoML's CLI replaced by one that asks for the folder ``bentoml
#: serve`` hands its workers; prints that folder, BentoML's shared one, and whether the folder
#: is still there after the exit handlers ran. In a process of its own: importing BentoML's
#: CLI reads BentoML's configuration, which a service imported earlier in the same process
#: has changed.
LAUNCH_PROBE = """
import atexit, json, os, sys
import bentoml_cli.cli
from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml.serving import ensure_prometheus_dir
from serving.web import launch

shared = BentoMLContainer.prometheus_multiproc_dir.get()
seen, at_exit = [], []
bentoml_cli.cli.cli = lambda: seen.append(ensure_prometheus_dir(clean=False, use_alternative=False))
launch.atexit.register = lambda *call: at_exit.append(call)
sys.argv = ["launch", "serve"]
try:
    launch.main()
except SystemExit:
    pass
for function, *args in at_exit:
    function(*args)
print(json.dumps({"seen": seen, "shared": shared, "left": [os.path.exists(f) for f in seen]}))
"""


def test_launch_hands_bentoml_a_prometheus_folder_of_the_servers_own(tmp_path):
    from _bentoml_impl.server.serving import serve_http

    from serving.web.supervision import SERVER_PID_VARIABLE

    first_call_line(serve_http, "ensure_prometheus_dir")  # the folder `bentoml serve` uses
    env = {**os.environ, SERVER_PID_VARIABLE: "", "BENTOML_HOME": str(tmp_path)}
    probe = subprocess.run(
        [sys.executable, "-c", LAUNCH_PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    (folder,) = found["seen"]
    assert folder != found["shared"] and os.path.basename(folder).startswith("imgclf-server-")
    assert found["left"] == [False]  # removed when the server exits


# Ray: no usage statistics


def test_a_ray_job_starts_ray_with_usage_statistics_off(monkeypatch):
    ray = pytest.importorskip("ray")
    from ray._common.usage import usage_lib

    from serving.batch import ray_engine

    variable = "RAY_USAGE_STATS_ENABLED"
    monkeypatch.setenv(variable, "1")  # so that it is unset again afterwards
    monkeypatch.delenv(variable)
    seen = []

    def init(**options):  # what Ray would read as it starts
        seen.append((os.environ.get(variable), usage_lib.usage_stats_enabled()))

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    assert ray_engine.connect(None, num_cpus=1)
    assert seen == [("0", False)], f"Ray's usage statistics were on: {variable}={seen}"


class RecordingTransport(asyncio.Transport):
    """A connection's transport that keeps what is written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 3000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def answered(protocol_class, requests: bytes) -> RecordingTransport:
    """``requests`` fed to one connection of ``protocol_class`` (on uvicorn's own config,
    serving ``app``) until it has answered them."""
    import uvicorn
    from uvicorn.server import ServerState

    async def serve() -> RecordingTransport:
        config = uvicorn.Config(app, log_config=None)
        config.load()
        protocol = protocol_class(config, ServerState(), app_state={})
        transport = RecordingTransport()
        protocol.connection_made(transport)
        protocol.data_received(requests)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if requests.count(b"HTTP/1.1\r\n") == b"".join(transport.writes).count(b"HTTP/1.1 "):
                break
        protocol.connection_lost(None)
        return transport

    return asyncio.run(serve())


def test_an_answer_is_written_head_and_body_in_one_write(installed):
    """uvicorn writes a response's head and body as two writes (two TCP segments); the
    bounded protocol's transport joins them: one per answer, a HEAD answer's head included
    (it has no body to wait for)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    head = b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n"
    upstream = answered(HttpToolsProtocol, request)
    assert len(upstream.writes) == 2 and upstream.writes[1] == b"ok"  # what uvicorn does
    ours = answered(installed.BoundedHttpToolsProtocol, request + head + request)
    assert len(ours.writes) == 3, ours.writes
    assert ours.writes[0] == b"".join(upstream.writes) == ours.writes[2]
    head_only = ours.writes[1]
    assert head_only.startswith(b"HTTP/1.1 200 OK\r\n") and head_only.endswith(b"\r\n\r\n")


def test_what_is_not_an_answer_is_written_at_once():
    from serving.web.http_limits import HeadWithBody

    transport = RecordingTransport()
    joined = HeadWithBody(transport)
    joined.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert transport.writes == [b"HTTP/1.1 100 Continue\r\n\r\n"]
    joined.write(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
    assert len(transport.writes) == 1  # held for its body
    joined.close()  # a failed answer: the head goes out before the connection closes
    assert transport.writes[1].startswith(b"HTTP/1.1 500") and transport.closed
