"""The worker's HTTP protocol: a bound on a request's header bytes, enforced while they
arrive, and how long an idle keep-alive connection is kept.

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

BentoML builds the uvicorn configuration itself, with no way to name a protocol class, so
``install`` points uvicorn's ``"auto"`` protocol at this one in the worker process before
uvicorn loads it (uvicorn 0.54, pinned; ``tests/serving/web/test_hostile_callers.py``
sends the oversized header to a real server, ``tests/serving/web/test_drain.py`` holds an
idle connection).
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)


def bounded_protocol(max_header_bytes: int, keep_alive_timeout_s: int = 5):
    """uvicorn's httptools protocol, answering 431 once a request's head passes the limit,
    and keeping idle connections ``keep_alive_timeout_s``."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    body = json.dumps(
        {"error": f"the request line and headers exceed {max_header_bytes} bytes"}
    ).encode()
    answer = (
        b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
        b"content-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n"
        b"connection: close\r\n\r\n" + body
    )

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        limit = max_header_bytes

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.timeout_keep_alive = keep_alive_timeout_s  # read when a response ends

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_bytes = 0
            self._in_head = True

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            if self._in_head and self._head_bytes > self.limit and not self.transport.is_closing():
                log.info("refused a request whose head passed %d bytes (431)", self.limit)
                self.transport.write(answer)
                self.transport.close()

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._in_head, self._head_bytes = True, 0
            super().on_message_complete()

    return BoundedHttpToolsProtocol


def install(max_header_bytes: int, keep_alive_timeout_s: int) -> bool:
    """Make this process's uvicorn servers use the bounded protocol; False when httptools is
    not installed (uvicorn then runs h11, whose own limit is 16 KiB, with its own
    keep-alive timeout)."""
    try:
        import httptools  # noqa: F401
        from uvicorn import config
    except ImportError:
        return False
    protocol = bounded_protocol(max_header_bytes, keep_alive_timeout_s)
    # uvicorn imports the class named by "module:attribute" from this table when it starts.
    globals()["BoundedHttpToolsProtocol"] = protocol
    config.HTTP_PROTOCOLS["auto"] = config.HTTP_PROTOCOLS["httptools"] = (
        f"{__name__}:BoundedHttpToolsProtocol"
    )
    return True
