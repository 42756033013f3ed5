"""One loaded version as a worker serves it: its runtime, its batcher and, when live, the
observer of its predictions (``ServedVersion``, built by ``serving.web.version_builder``);
the lease a request holds on it; and how it is retired once no request holds one."""

from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from collections.abc import Callable

import numpy as np

from monitoring.assessment import Answers
from monitoring.predictions import PredictionObserver
from serving.core.runtime import ClassifierRuntime
from serving.core.sessions import release_freed_memory
from serving.web.batcher import AdaptiveBatcher

log = logging.getLogger(__name__)


class ServedVersion:
    """One loaded version in one role: its runtime (shared when a shadow is promoted), its
    own batcher and, when live, the observer of its predictions."""

    def __init__(
        self,
        runtime: ClassifierRuntime,
        batcher: AdaptiveBatcher,
        predictions: PredictionObserver | None = None,
        unobserved: Callable[[], AdaptiveBatcher] | None = None,
    ) -> None:
        self.runtime = runtime
        self.batcher = batcher
        self.predictions = predictions
        #: Makes a batcher whose answers no observer records (``/explain``'s covered copies).
        self._unobserved = unobserved
        self._explain_batcher: AdaptiveBatcher | None = None
        #: Requests holding a lease on this version (changed under ``ModelSet``'s lock).
        self.in_flight = 0

    @property
    def version(self) -> int:
        return self.runtime.version

    async def classify(self, images: np.ndarray) -> Answers:
        return await self.batcher.submit(images)

    def explain_batcher(self) -> AdaptiveBatcher:
        """The batcher ``/explain`` runs its forward passes on, made the first time."""
        if self._explain_batcher is None:
            if self._unobserved is None:
                raise RuntimeError("this version was built without an explanation batcher")
            self._explain_batcher = self._unobserved()
        return self._explain_batcher

    def close(self) -> None:
        self.batcher.close_threadsafe()
        if self._explain_batcher is not None:
            self._explain_batcher.close_threadsafe()
        if self.predictions is not None:
            self.predictions.retire()


class Lease:
    """A request's hold on one version: ``with model_set.lease() as served: ...``."""

    __slots__ = ("_lock", "served")

    def __init__(self, served: ServedVersion, lock: threading.Lock) -> None:
        self.served = served
        self._lock = lock

    def __enter__(self) -> ServedVersion:
        return self.served

    def __exit__(self, *exc) -> None:
        with self._lock:
            self.served.in_flight -= 1


def retire(old: ServedVersion, after_s: float) -> None:
    """Close ``old`` once its leases are returned (or after ``after_s``), then free its
    sessions' memory, on a thread of its own."""

    def wait_then_close(retiring: list[ServedVersion]) -> None:
        served = retiring.pop()  # the last reference but this frame's
        deadline = time.monotonic() + after_s
        while served.in_flight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if served.in_flight > 0:
            log.warning(
                "version %d still had %d request(s) after %.0f s; closing it",
                served.version,
                served.in_flight,
                after_s,
            )
        served.close()
        runtime = weakref.ref(served.runtime)
        del served
        # The batcher closes on the event loop: the sessions go once it has.
        deadline = time.monotonic() + after_s
        while runtime() is not None and time.monotonic() < deadline:
            time.sleep(0.1)
            gc.collect()
        release_freed_memory()

    threading.Thread(target=wait_then_close, args=([old],), name="retire", daemon=True).start()
