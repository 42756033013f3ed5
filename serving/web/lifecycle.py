"""A worker's life: loading, warming, ready, draining (or failed), and the requests in flight.

``/readyz`` answers from here, with the reason when it is not ready. On SIGTERM a worker must
report unready at once, keep answering (the load balancer may still send requests until it
sees the 503), finish what is in flight, and only then stop. uvicorn stops accepting
connections the moment it sees SIGTERM, while BentoML's process manager still holds the
listening socket (so new connections would hang, not even get a 503); hence
``drain_before_exit`` hands SIGTERM to uvicorn only once the worker is idle.
"""

from __future__ import annotations

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
        self._on_ready = on_ready
        self._in_flight = 0
        self._idle = threading.Condition()

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
        if self._on_ready is not None:
            self._on_ready(self.ready)

    def started(self) -> None:
        with self._idle:
            self._in_flight += 1

    def finished(self) -> None:
        with self._idle:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.notify_all()

    def wait_until_idle(self, timeout_s: float) -> bool:
        """Block until no request is in flight (True) or ``timeout_s`` passes (False)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout_s)

    def readiness(self) -> tuple[int, dict]:
        """What ``/readyz`` answers: 200, or 503 with the state and why."""
        if self.ready:
            return 200, {"status": READY}
        reason = f"not ready: {self.state}" + (f" ({self.detail})" if self.detail else "")
        return 503, {"error": reason, "status": self.state}


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
        self.lifecycle.started()
        try:
            await self.app(scope, receive, send)
        finally:
            self.lifecycle.finished()


def drain_before_exit(lifecycle: Lifecycle, timeout_s: float) -> bool:
    """On SIGTERM: report ``draining`` at once, and pass the signal on to the server's own
    handler (uvicorn's, which stops accepting and exits) once no request is in flight, or
    after ``timeout_s``. Call it from the worker's main thread while the server runs (the
    service's constructor); returns False where there is no server handler to defer."""
    if threading.current_thread() is not threading.main_thread():
        return False  # in-process (tests): no server, no signals
    stop_server = signal.getsignal(signal.SIGTERM)
    if not callable(stop_server):
        return False

    def on_sigterm(signum, frame) -> None:
        if lifecycle.state == DRAINING:
            return  # the process manager repeats the signal; one drain is enough
        lifecycle.set(DRAINING, f"SIGTERM; finishing {lifecycle.in_flight} request(s)")

        def stop_when_idle() -> None:
            started = time.monotonic()
            drained = lifecycle.wait_until_idle(timeout_s)
            log.info(
                "drain %s after %.2f s; stopping",
                "complete" if drained else f"timed out ({lifecycle.in_flight} in flight)",
                time.monotonic() - started,
            )
            stop_server(signum, frame)

        threading.Thread(target=stop_when_idle, name="drain", daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)
    return True
