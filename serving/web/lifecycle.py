"""A worker's life: loading, warming, ready, draining (or failed), and the requests in flight.

``/readyz`` answers from here, with the reason when it is not ready, and with how many of the
server's workers serve. On SIGTERM a worker must report unready at once, keep answering new
requests for a drain window (a load balancer keeps sending until it has seen the 503 or the
orchestrator's endpoint removal has reached it), each answer with ``Connection: close`` so
that no keep-alive connection outlives the window, then finish what is in flight and stop.
uvicorn stops accepting connections the moment it sees SIGTERM, while BentoML's process
manager still holds the listening socket (so new connections would hang, not even get a
503); hence ``drain_before_exit`` hands SIGTERM to uvicorn only once the window has passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

LOADING, WARMING, READY, DRAINING, FAILED = "loading", "warming", "ready", "draining", "failed"
#: Paths that are not work: they never delay a drain.
PROBE_PATHS = frozenset({"/readyz", "/livez", "/healthz", "/metrics"})


class Lifecycle:
    """State of one worker process. ``on_ready(bool)`` is told of every change (a gauge)."""

    def __init__(self, on_ready: Callable[[bool], None] | None = None) -> None:
        self.state = LOADING
        self.detail = "loading the model"
        self._on_ready = [on_ready] if on_ready else []
        self._in_flight = 0
        self._idle = threading.Condition()
        #: () -> {"ready": n, "of": N}: the server's workers that serve, where a server runs
        #: around this worker (``serving.web.supervision.WorkerRoll.census``).
        self.census: Callable[[], dict] | None = None
        #: Other listeners of this worker (gRPC), told to stop accepting when HTTP stops,
        #: with the seconds left to finish what they have in flight.
        self.listeners: list[Callable[[float], None]] = []

    def on_ready(self, callback: Callable[[bool], None]) -> None:
        """Also tell ``callback`` of every change of readiness (from now on)."""
        self._on_ready.append(callback)

    @property
    def ready(self) -> bool:
        return self.state == READY

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def set(self, state: str, detail: str = "") -> None:
        if self.state == DRAINING and state != DRAINING:
            return  # nothing brings a draining worker back
        self.state, self.detail = state, detail
        log.info("worker %s%s", state, f": {detail}" if detail else "")
        for callback in self._on_ready:
            callback(self.ready)

    def started(self) -> None:
        with self._idle:
            self._in_flight += 1

    def finished(self) -> None:
        with self._idle:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.notify_all()

    @contextlib.contextmanager
    def serving(self, send):
        """One request in flight (``with lifecycle.serving(send) as send:``), counted until
        it ends; its ``send``, which closes the connection with the answer while the worker
        drains (``closing``). Both ways in use it: ``LifecycleMiddleware`` and the hot path."""
        self.started()
        try:
            yield closing(send) if self.draining else send
        finally:
            self.finished()

    def wait_until_idle(self, timeout_s: float) -> bool:
        """Block until no request is in flight (True) or ``timeout_s`` passes (False)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout_s)

    @property
    def draining(self) -> bool:
        return self.state == DRAINING

    def readiness(self) -> tuple[int, dict]:
        """What ``/readyz`` answers: 200, or 503 with the state and why; with the server's
        workers that serve, of how many, where a server runs around this worker. A server
        below its worker count (one died and is being replaced) still answers 200 from its
        ready workers, and says so: its balancer should keep sending, its operator should
        know (``imgclf_workers_ready`` and the alert ``ImgclfWorkersMissing``). So does a
        replacement worker that is still warming while its siblings serve: the kernel hands it
        connections as soon as it listens, and a 503 from it would take the whole server out
        of its balancer for a worker's warm-up (its model is loaded: it answers predictions,
        only slower at first)."""
        workers = {"workers": self.census()} if self.census else {}
        if self.ready:
            return 200, {"status": READY, **workers}
        if self.state == WARMING and workers and workers["workers"]["ready"] > 0:
            return 200, {"status": READY, "this_worker": WARMING, **workers}
        reason = f"not ready: {self.state}" + (f" ({self.detail})" if self.detail else "")
        return 503, {"error": reason, "status": self.state, **workers}


class LifecycleMiddleware:
    """ASGI middleware: answers ``/readyz`` and counts the requests in flight."""

    def __init__(self, app, lifecycle: Lifecycle) -> None:
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path == "/readyz" and scope["method"] == "GET":  # other methods: BentoML's 405
            status, body = self.lifecycle.readiness()
            payload = json.dumps(body).encode()
            headers = [(b"content-type", b"application/json")]
            if status == 503:
                headers.append((b"retry-after", b"1"))
            headers.append((b"content-length", str(len(payload)).encode()))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": payload})
            return
        if path in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        with self.lifecycle.serving(send) as answer:
            await self.app(scope, receive, answer)


def closing(send):
    """``send``, with ``Connection: close`` on the answer: while a worker drains, a client
    must not keep a connection that the worker closes when its window ends (a request sent
    on it at that moment would be lost, not refused)."""

    async def send_closing(message) -> None:
        if message["type"] == "http.response.start":
            headers = [h for h in message.get("headers", []) if h[0].lower() != b"connection"]
            message = {**message, "headers": [*headers, (b"connection", b"close")]}
        await send(message)

    return send_closing


#: Once the window is over and the worker accepts no more connections, the time a connection
#: accepted just before has to deliver its request (it then counts as in flight).
ACCEPTED_GRACE_S = 0.25


def stop_accepting(stop_server: Callable, loop: asyncio.AbstractEventLoop | None) -> bool:
    """Close this worker's listening sockets (uvicorn's ``servers``, on the server's loop),
    so that no new connection reaches a worker about to stop; its siblings, and the process
    manager's socket, keep accepting. Without it, a client that reconnected in the last
    instant (every answer in the window says ``Connection: close``) had its connection
    accepted, then closed by uvicorn's shutdown before its request was read: an error with no
    answer, which a restart under load showed about once in two. False where the handler is
    not a uvicorn server's."""
    listeners = getattr(getattr(stop_server, "__self__", None), "servers", None)
    if loop is None or not listeners:
        return False
    for listener in listeners:
        loop.call_soon_threadsafe(listener.close)
    return True


def drain_before_exit(lifecycle: Lifecycle, window_s: float, timeout_s: float) -> bool:
    """On SIGTERM: report ``draining`` at once and keep serving for ``window_s``; then pass
    the signal on to the server's own handler (uvicorn's, which stops accepting and waits for
    the requests in flight) once no request is in flight, or stop at ``timeout_s`` after the
    signal whatever is in flight. Call it from the worker's main thread while the server
    runs (the service's constructor); returns False where there is no server handler to
    defer."""
    if threading.current_thread() is not threading.main_thread():
        return False  # in-process (tests): no server, no signals
    stop_server = signal.getsignal(signal.SIGTERM)
    if not callable(stop_server):
        return False
    window_s = min(window_s, timeout_s)

    def on_sigterm(signum, frame) -> None:
        if lifecycle.draining:
            return  # the process manager repeats the signal; one drain is enough
        try:
            loop = asyncio.get_running_loop()  # the server's: a signal runs on its thread
        except RuntimeError:
            loop = None
        lifecycle.set(
            DRAINING,
            f"{signal.Signals(signum).name}; serving {window_s:g} s more, then finishing "
            "what is in flight "
            f"({lifecycle.in_flight} request(s) now)",
        )

        def stop_after_window() -> None:
            started = time.monotonic()
            time.sleep(window_s)
            for stop_listening in lifecycle.listeners:
                stop_listening(max(0.0, timeout_s - window_s))
            if stop_accepting(stop_server, loop):
                time.sleep(ACCEPTED_GRACE_S)
            log.info(
                "drain window of %g s over: finishing %d request(s)", window_s, lifecycle.in_flight
            )
            drained = lifecycle.wait_until_idle(max(0.0, timeout_s - window_s))
            log.info(
                "drain %s after %.2f s; stopping",
                "complete" if drained else f"timed out ({lifecycle.in_flight} in flight)",
                time.monotonic() - started,
            )
            stop_server(signum, frame)

        threading.Thread(target=stop_after_window, name="drain", daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    # A hang-up (a closed terminal, a stray kill -HUP) ended a worker at once, its requests
    # cut off: it drains as on SIGTERM, and the server replaces it.
    signal.signal(signal.SIGHUP, on_sigterm)
    return True
