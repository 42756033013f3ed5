"""Load for tests that must lose nothing: callers posting real images to a real server until
stopped, every answer kept with when it was sent and received."""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

#: httpcore's trace events (``extensions={"trace": ...}``) that say when a request left.
HEADERS_WRITTEN = "http11.send_request_headers.started"
CONNECTING = "connection.connect_tcp.started"


async def _mark(marks: dict[str, float], event: str, info: dict) -> None:
    """Keep when each trace event first happened."""
    marks.setdefault(event, time.monotonic())


class Load:
    """``concurrency`` callers, each on a keep-alive connection of its own, posting real
    digit images to ``/predict`` until stopped; every answer kept as ``(sent, received,
    status, model_version)`` (``time.monotonic``; sent: when the request's headers were
    written, or its connection tried; status 0: no answer, a connection error), and each
    connection error's text in ``errors``."""

    def __init__(self, url: str, images: list[bytes], concurrency: int = 32) -> None:
        self.url, self.images, self.concurrency = url, images, concurrency
        self.answers: list[tuple[float, float, int, int | None]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=90)

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency)
        async with httpx.AsyncClient(base_url=self.url, timeout=60, limits=limits) as client:
            await asyncio.gather(*(self._caller(client, i) for i in range(self.concurrency)))

    async def _caller(self, client: httpx.AsyncClient, index: int) -> None:
        while not self._stop.is_set():
            image = self.images[(index * 7919 + len(self.answers)) % len(self.images)]
            began = time.monotonic()
            marks: dict[str, float] = {}
            try:
                answer = await client.post(
                    "/predict",
                    files={"image": ("d.png", image)},
                    extensions={"trace": functools.partial(_mark, marks)},
                )
                status = answer.status_code
                version = answer.json().get("model_version") if status == 200 else None
            except httpx.HTTPError as error:
                status, version = 0, None
                self.errors.append(f"{type(error).__name__}: {error}")
                await asyncio.sleep(0.01)  # a refused connection fails at once: do not spin
            # Sent: when its request left (its headers were written), or when its connection
            # was tried, not when the caller began. With 16 callers on one busy loop, requests
            # began up to 140 ms before their connection existed (measured in a drain test:
            # begun before the window ended, connected after it).
            sent = marks.get(HEADERS_WRITTEN, marks.get(CONNECTING, began))
            self.answers.append((sent, time.monotonic(), status, version))

    def between(self, start: float, end: float) -> set:
        """Versions of the answers sent after ``start`` and received before ``end``."""
        return {v for sent, got, _, v in self.answers if sent >= start and got <= end}

    def sent_before(self, moment: float) -> list[int]:
        """Statuses of the requests sent before ``moment``."""
        return [status for sent, _, status, _ in self.answers if sent < moment]


def slow_batch_body(boundary: str = "drainboundary") -> tuple[bytes, dict[str, str]]:
    """A ``/predict_batch`` body of two 12-megapixel JPEGs, and its headers."""
    from tests.serving.cases import large_photo

    photo = large_photo()
    part = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="p.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + photo
        + b"\r\n"
    )
    body = part * 2 + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def in_progress(url: str) -> float:
    """Requests in progress on the server, from ``imgclf_requests_in_progress`` (each
    worker's figure is written once a second)."""
    text = httpx.get(url + "/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("imgclf_requests_in_progress")
    )


class SlowUploads:
    """``count`` ``/predict_batch`` calls uploading their body over about two seconds, as
    phones on a poor network would, all in flight together once entered; ``answers()`` waits
    for them. Meanwhile ``/readyz`` is probed every 0.1 s (``readiness``: statuses, 0 for no
    answer)."""

    def __init__(self, url: str, count: int = 24) -> None:
        self.url, self.count = url, count
        self.body, self.headers = slow_batch_body()
        self.readiness: list[int] = []
        self._connected = threading.Barrier(count + 1)
        self._pool = ThreadPoolExecutor(count)

    def _slowly(self):
        chunk = len(self.body) // 20 + 1
        for start in range(0, len(self.body), chunk):
            yield self.body[start : start + chunk]
            time.sleep(0.1)

    def _call(self) -> httpx.Response:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            client.get("/livez")  # connected
            self._connected.wait()
            return client.post(
                "/predict_batch",
                content=self._slowly(),
                headers=self.headers,
                params={"top_k": "1"},
            )

    def __enter__(self) -> SlowUploads:
        self._calls = [self._pool.submit(self._call) for _ in range(self.count)]
        self._connected.wait()
        deadline = time.time() + 1.5  # each upload lasts two seconds
        while in_progress(self.url) < self.count:
            assert time.time() < deadline, f"the {self.count} calls never were in flight together"
            time.sleep(0.05)
        return self

    def answers(self) -> list[httpx.Response]:
        while not all(call.done() for call in self._calls):
            try:
                self.readiness.append(httpx.get(self.url + "/readyz", timeout=5).status_code)
            except httpx.TransportError:
                self.readiness.append(0)
            time.sleep(0.1)
        return [call.result() for call in self._calls]

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True)
