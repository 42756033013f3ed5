"""The shadow version's side of a worker: copies of a fraction of the live requests, taken
after their answers are computed, through a bounded queue drained by a thread of its own at
a lower priority. It never delays a live answer; copies are dropped (and counted) when it
falls behind. The shadow's answers are compared with the live ones
(``monitoring.shadow.ShadowObserver``), never returned."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from monitoring.shadow import ShadowObserver

if TYPE_CHECKING:
    from serving.web.served import ServedVersion

log = logging.getLogger(__name__)


class ShadowCopies:
    """Copies of live requests for the shadow version: offered on the event loop (one random
    draw and a deque append), compared on the shadow's own thread."""

    def __init__(
        self,
        shadow: ServedVersion,
        live: ServedVersion,
        fraction: float,
        observer: ShadowObserver,
        *,
        max_pending_images: int,
        drift_interval_s: float,
        nice: int = 10,
    ) -> None:
        self.served = shadow
        self.live_version = live.version
        self.fraction = fraction
        self.observer = observer
        #: The same preprocessing: the live request's decoded images serve the shadow too.
        self.same_input = shadow.runtime.spec == live.runtime.spec
        self.max_pending_images = max_pending_images
        self.drift_interval_s = drift_interval_s
        self._queue: deque = deque()
        self._pending = 0
        self._scheduled = False
        self._closed = False
        self._lock = threading.Lock()
        self._last_drift = 0.0
        #: How long the shadow's thread lets copies gather before a batch.
        self.collect_s = 0.02
        self._executor = ThreadPoolExecutor(
            1, thread_name_prefix="shadow", initializer=lower_priority, initargs=(nice,)
        )

    @property
    def version(self) -> int:
        return self.served.version

    def offer(self, images: np.ndarray | None, blobs: list[bytes] | None, live: np.ndarray) -> None:
        """A live request's inputs and answers; the shadow takes ``fraction`` of them."""
        if self.fraction < 1 and random.random() >= self.fraction:
            return
        count = len(live)
        payload = images if self.same_input else blobs
        if payload is None:
            self.observer.counted("skipped", count)
            return
        with self._lock:
            if self._closed or self._pending + count > self.max_pending_images:
                self.observer.counted("dropped", count)
                return
            self._pending += count
            self._queue.append((payload, live))
            if self._scheduled:
                return
            self._scheduled = True
        self._executor.submit(self._drain)

    def _drain(self) -> None:
        buckets = self.served.runtime.buckets
        while True:
            if self._pending < buckets[-1]:
                # Nobody waits for the shadow: let copies gather into larger batches, fewer
                # calls (each holds the GIL a little, which the live event loop shares).
                time.sleep(self.collect_s)
            with self._lock:
                # Whole requests up to the largest batch size that needs no padding.
                target = max((b for b in buckets if b <= self._pending), default=buckets[0])
                taken, size = [], 0
                while self._queue and (not taken or size + len(self._queue[0][1]) <= target):
                    item = self._queue.popleft()
                    taken.append(item)
                    size += len(item[1])
                if not taken:
                    self._scheduled = False
                    return
            try:
                self._compare(taken)
            except Exception:
                log.exception("shadow version %d failed on %d images", self.version, size)
                self.observer.counted("failed", size)
            finally:
                with self._lock:
                    self._pending -= size

    def _compare(self, taken: list) -> None:
        if self.same_input:
            images = np.concatenate([payload for payload, _ in taken])
        else:
            runtime = self.served.runtime
            images = np.stack(
                [runtime.preprocess(blob) for payload, _ in taken for blob in payload]
            )
        live = np.concatenate([answers for _, answers in taken])
        started = time.perf_counter()
        shadow = self.served.runtime.predict(images)
        self.observer.compared(images, live, shadow, time.perf_counter() - started)
        if time.monotonic() - self._last_drift >= self.drift_interval_s:
            self._last_drift = time.monotonic()
            self.observer.compute_drift()

    def describe(self) -> dict:
        return {
            "version": self.version,
            "fraction": self.fraction,
            "compared_against": self.live_version,
            "same_input": self.same_input,
            "pending_images": self._pending,
            "max_pending_images": self.max_pending_images,
            **self.observer.summary(),
        }

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._queue.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)


def lower_priority(nice: int) -> None:
    """Run the calling thread at ``nice`` (Linux schedules threads one by one): on a busy
    machine the shadow gets the CPU the live requests leave, falls behind and drops copies,
    rather than taking CPU from them. ONNX Runtime runs a one-thread session on the calling
    thread, so its inference is lowered too."""
    if nice <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError) as error:  # not Linux, or not allowed
        log.warning("could not lower the shadow thread's priority: %s", error)
