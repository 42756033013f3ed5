"""The worker's HTTP protocol: a bound on a request's header bytes and on the time they take
to arrive, enforced while they arrive, and how long an idle keep-alive connection is kept.

BentoML's workers run uvicorn with httptools, which has no limit of its own: a 128 MiB
header took 22 s to parse (httptools joins each header's pieces as they come) and held every
other request of that worker, ``/readyz`` included. uvicorn's h11 protocol has a limit but
is several times slower. So each worker runs uvicorn's httptools protocol with a byte count:
a request whose request line and headers pass ``max_header_bytes`` before they end is
answered 431 and its connection closed, after at most one more read (256 KiB) was parsed.

uvicorn closes an idle keep-alive connection after 5 s by default, while the balancers in
front of such a service keep theirs for 60 s and more: a balancer that sends a request on a
connection the server is closing at that moment answers it 502 (the well-known source of
intermittent 502s behind AWS ALB or nginx). BentoML passes uvicorn its own keep-alive timeout
only when ``bentoml serve --timeout-keep-alive`` is given, which a Bento's container does
not; so the protocol sets ``keep_alive_timeout_s`` itself.

uvicorn writes an answer's status line and headers, then its body, as two writes: two TCP
segments, each a system call for the worker and a read for the client. The protocol's
transport (``HeadWithBody``) joins them, which measured 2 to 4 % more digit uploads a
second. And the protocol hands each request to ``around_app(app)`` when that is given: the
service's hot path (``serving.web.hot_path``), outside everything BentoML puts in ``app``.

BentoML builds the uvicorn configuration itself, with no way to name a protocol class, so
``install`` points uvicorn's ``"auto"`` protocol at this one in the worker process before
uvicorn loads it (uvicorn 0.54, pinned; ``tests/serving/web/test_hostile_callers.py``
sends the oversized header to a real server, ``tests/serving/web/test_drain.py`` holds an
idle connection).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


def _answer(status: str, error: str) -> bytes:
    """A complete HTTP/1.1 answer with a JSON error, closing the connection."""
    body = json.dumps({"error": error}).encode()
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


def bounded_protocol(
    max_header_bytes: int,
    keep_alive_timeout_s: int = 5,
    header_timeout_s: float = 30.0,
    around_app: Callable | None = None,
):
    """uvicorn's httptools protocol, answering 431 once a request's head passes the limit,
    408 when a head takes longer than ``header_timeout_s`` to arrive, and keeping idle
    connections ``keep_alive_timeout_s``; its requests go to ``around_app(app)`` (built once
    per app) instead of uvicorn's ``app``, where that is given (``serving.web.hot_path``)."""
    wrapped: dict[int, object] = {}

    def around(app):
        if id(app) not in wrapped:
            wrapped[id(app)] = around_app(app)
        return wrapped[id(app)]

    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    too_large = _answer(
        "431 Request Header Fields Too Large",
        f"the request line and headers exceed {max_header_bytes} bytes",
    )
    too_slow = _answer(
        "408 Request Timeout",
        f"the request line and headers took more than {header_timeout_s:g} s to arrive",
    )

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        limit = max_header_bytes

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            if around_app is not None:
                self.app = around(self.app)
            self.timeout_keep_alive = keep_alive_timeout_s  # read when a response ends
            self._head_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            # After FlowControl took the socket's own transport: answers go through this one.
            self.transport = HeadWithBody(transport)
            self._head_bytes = 0
            self._in_head = True
            # A connection that never sends a byte, or a head that trickles in, holds a
            # socket: the head must be complete within the timeout (uvicorn has no bound).
            self._start_head_timer()

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                if self._head_timer is None:  # the first bytes of a next request
                    self._start_head_timer()
                # Only the head's own bytes count, however they arrive: one write may carry
                # the whole head and its body (the parser would end the head first).
                end = data.find(b"\r\n\r\n")
                self._head_bytes += len(data) if end < 0 else end + 4
                if self._head_bytes > self.limit:
                    log.info("refused a request whose head passed %d bytes (431)", self.limit)
                    self._refuse(too_large)
                    return
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._stop_head_timer()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            self.transport.flush()  # a HEAD answer: a head and no body
            super().on_response_complete()

        def on_message_complete(self) -> None:
            self._in_head, self._head_bytes = True, 0
            super().on_message_complete()

        def connection_lost(self, exc) -> None:
            self._stop_head_timer()
            super().connection_lost(exc)

        def _start_head_timer(self) -> None:
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timed_out)

        def _stop_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self._in_head:
                self._refuse(too_slow if self._head_bytes else b"")

        def _refuse(self, answer: bytes) -> None:
            if not self.transport.is_closing():
                if answer:
                    self.transport.write(answer)
                self.transport.close()

    return BoundedHttpToolsProtocol


def install(
    max_header_bytes: int,
    keep_alive_timeout_s: int,
    header_timeout_s: float,
    around_app: Callable | None = None,
) -> bool:
    """Make this process's uvicorn servers use the bounded protocol (and ``around_app``);
    False when httptools is not installed (uvicorn then runs h11, whose own limit is 16 KiB,
    with its own keep-alive timeout, and BentoML's app as it is)."""
    try:
        import httptools  # noqa: F401
        from uvicorn import config
    except ImportError:
        return False
    protocol = bounded_protocol(
        max_header_bytes, keep_alive_timeout_s, header_timeout_s, around_app
    )
    # uvicorn imports the class named by "module:attribute" from this table when it starts.
    globals()["BoundedHttpToolsProtocol"] = protocol
    config.HTTP_PROTOCOLS["auto"] = config.HTTP_PROTOCOLS["httptools"] = (
        f"{__name__}:BoundedHttpToolsProtocol"
    )
    return True


class HeadWithBody:
    """The connection's transport, writing a response's status line and headers together
    with its first piece of body: uvicorn writes them as two ``send`` calls, two TCP segments
    for the client to read. Anything else is written as it comes (a ``100 Continue``, our 431
    and 408), and a head still held is written when the response completes or the connection
    closes (a HEAD answer, a failed one)."""

    def __init__(self, transport) -> None:
        self._transport = transport
        self._head: bytes | None = None

    def write(self, data) -> None:
        if self._head is None:
            if (
                isinstance(data, bytes)
                and data.startswith(b"HTTP/1.1 ")
                and not data.startswith(b"HTTP/1.1 1")
            ):
                self._head = data
                return
        else:
            data, self._head = self._head + data, None
        self._transport.write(data)

    def flush(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str):
        return getattr(self._transport, name)
