"""Adaptive batching inside one worker process.

Requests queue up while ONNX Runtime runs the previous batch; when the session is free, the
next batch takes everything queued (up to ``max_batch_size`` images, whole requests only),
optionally after waiting ``max_wait_s`` for more. A quiet server answers a lone request at
once; a busy one runs large batches. The batcher only groups requests: padding each batch
to a warmed shape is the runtime's business (``ClassifierRuntime.predict``).

Why not BentoML's ``batchable=True``: it batches one argument per API, answers some
failures as plain-text 500s, cannot pad to warmed shapes, and lives behind a second
service hop. This one is ~150 lines, used by the HTTP routes of each worker.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from monitoring.assessment import Answers
from serving.core.errors import ImgclfError


class OverloadedError(ImgclfError):
    """The queue is full, or a request waited past its deadline: retry later (503)."""

    status_code = 503
    reason = "overloaded"


class Encoded:
    """One request's image, still encoded: its batch's inference thread decodes it (with the
    version's preprocessing) just before the batch runs, and keeps the result in ``images``
    for the request (its shadow copy). For a small image the hop to a decode thread and back
    cost more than the decoding (``WorkerContext.prepare``)."""

    def __init__(
        self,
        data: bytes,
        preprocess: Callable[[bytes], np.ndarray],
        on_decoded: Callable[[float], None] | None = None,
    ) -> None:
        self.data = data
        self._preprocess = preprocess
        self._on_decoded = on_decoded
        #: ``(1, height, width, channels)``, once decoded.
        self.images: np.ndarray | None = None

    def __len__(self) -> int:
        return 1

    def decode(self) -> np.ndarray:
        started = time.perf_counter()
        self.images = self._preprocess(self.data)[np.newaxis]
        if self._on_decoded is not None:
            self._on_decoded(time.perf_counter() - started)
        return self.images


@dataclass
class _Waiting:
    images: np.ndarray | Encoded
    future: asyncio.Future
    enqueued: float


class AdaptiveBatcher:
    """Batches concurrent ``submit`` calls of one event loop into calls of ``infer``.

    ``infer`` runs on one dedicated thread (ONNX Runtime releases the GIL), so the event
    loop keeps reading, decoding and answering while a batch runs. ``on_batch(images,
    probabilities, seconds)`` (metrics, drift) is called on the event loop after each batch,
    once the batch's requests have been woken: answers never wait for it.
    """

    def __init__(
        self,
        infer: Callable[[np.ndarray], Answers],
        *,
        max_batch_size: int,
        max_wait_s: float = 0.0,
        max_latency_s: float = 1.0,
        max_queue_size: int = 512,
        on_batch: Callable[[np.ndarray, Answers, float], None] | None = None,
        on_queue: Callable[[int], None] | None = None,
        on_wait: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_latency_s = max_latency_s
        self.max_queue_size = max_queue_size
        self._infer = infer
        self._on_batch = on_batch
        self._on_queue = on_queue
        self._on_wait = on_wait
        #: Seconds for queueing deadlines (a test passes its own clock).
        self._clock = clock
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="inference")
        self._queue: deque[_Waiting] = deque()
        self._queued_images = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    async def submit(self, images: np.ndarray | Encoded) -> Answers:
        """``infer``'s answer for ``images`` (one request's rows of it: probabilities, or
        ``Assessed`` answers), computed in a shared batch. An ``Encoded`` image that cannot
        be decoded fails its own request with the decoding's error, no other."""
        if not 1 <= len(images) <= self.max_batch_size:
            raise ValueError(f"a request must hold 1 to {self.max_batch_size} images")
        if self._queued_images + len(images) > self.max_queue_size:
            raise OverloadedError(
                f"the batch queue is full ({self._queued_images} images waiting); retry shortly"
            )
        loop = asyncio.get_running_loop()
        self._start(loop)
        future = loop.create_future()
        self._queue.append(_Waiting(images, future, self._clock()))
        self._queued_images += len(images)
        self._queue_changed()
        self._wakeup.set()
        return await future

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def close_threadsafe(self) -> None:
        """``close`` from another thread (a version retired by the watcher): on the event
        loop that runs the batches, if it ever ran one."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self.close()
        else:
            loop.call_soon_threadsafe(self.close)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is loop and self._task is not None and not self._task.done():
            return
        self._loop = loop
        self._wakeup = asyncio.Event()
        self._task = loop.create_task(self._run(), name="adaptive-batcher")

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.max_wait_s > 0:
                await self._wait_for_more()
            batch = self._take()
            if batch:
                await self._run_batch(batch)

    async def _wait_for_more(self) -> None:
        deadline = self._queue[0].enqueued + self.max_wait_s
        while self._queued_images < self.max_batch_size:
            remaining = deadline - self._clock()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Waiting]:
        """Whole requests from the front of the queue, up to ``max_batch_size`` images.
        Requests whose caller has gone are dropped; those past their deadline get 503."""
        batch: list[_Waiting] = []
        size = 0
        now = self._clock()
        while self._queue and size + len(self._queue[0].images) <= self.max_batch_size:
            waiting = self._queue.popleft()
            self._queued_images -= len(waiting.images)
            if waiting.future.done():  # cancelled: the client disconnected
                continue
            waited = now - waiting.enqueued
            if waited > self.max_latency_s:
                waiting.future.set_exception(
                    OverloadedError(
                        f"waited {waited * 1000:.0f} ms for a batch (limit "
                        f"{self.max_latency_s * 1000:.0f} ms); retry shortly"
                    )
                )
                continue
            if self._on_wait is not None:
                self._on_wait(waited)
            batch.append(waiting)
            size += len(waiting.images)
        self._queue_changed()
        return batch

    async def _run_batch(self, batch: list[_Waiting]) -> None:
        try:
            images, probabilities, seconds, failed = await self._loop.run_in_executor(
                self._executor, self._call, [waiting.images for waiting in batch]
            )
        except Exception as error:
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(error)
            return
        start = 0
        for index, waiting in enumerate(batch):
            if index in failed:
                if not waiting.future.done():
                    waiting.future.set_exception(failed[index])
                continue
            end = start + len(waiting.images)
            if not waiting.future.done():
                waiting.future.set_result(probabilities[start:end])
            start = end
        if self._on_batch is not None and images is not None:
            # after the callbacks that set_result scheduled
            self._loop.call_soon(self._on_batch, images, probabilities, seconds)

    def _call(
        self, parts: list[np.ndarray | Encoded]
    ) -> tuple[np.ndarray | None, Answers | None, float, dict[int, Exception]]:
        """On the inference thread: the requests' images decoded where they are still
        ``Encoded`` and joined into one batch (here, not on the event loop: np.concatenate
        releases the GIL), its answers and seconds, and the decoding error of each request
        (by its place in ``parts``) whose image could not be decoded."""
        decoded, failed = [], {}
        for index, part in enumerate(parts):
            if isinstance(part, Encoded):
                try:
                    part = part.decode()
                except Exception as error:  # the request's own image: it alone fails
                    failed[index] = error
                    continue
            decoded.append(part)
        if not decoded:
            return None, None, 0.0, failed
        images = decoded[0] if len(decoded) == 1 else np.concatenate(decoded)
        started = time.perf_counter()
        probabilities = self._infer(images)
        return images, probabilities, time.perf_counter() - started, failed

    def _queue_changed(self) -> None:
        if self._on_queue is not None:
            self._on_queue(len(self._queue))
