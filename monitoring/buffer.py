"""Hot-path metrics, kept in the worker process and written to the metrics in batches.

With several worker processes every Prometheus value lives in a memory-mapped file, and each
``inc``/``observe``/``set`` takes a lock, checks the process id and packs and writes the
value: a few microseconds, several times per request, which measured about 5 % of the
service's throughput. Here a request adds to a dictionary instead, and one writer applies
the sums once a ``interval`` (and before every scrape this worker answers), so a scrape is
at most ``interval`` behind for the other workers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

import numpy as np

from monitoring.metrics import observe_many

log = logging.getLogger(__name__)


class MetricBuffer:
    """Counter increments, histogram observations and gauge settings, by metric child."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._counts: dict = {}
        self._observed: dict = {}
        self._gauges: dict = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        #: Called first at every flush: whatever gathers its figures lazily (the prediction
        #: observer's pending batches) hands them over then.
        self._sources: list = []

    def add_source(self, drain) -> None:
        self._sources.append(drain)

    def remove_source(self, drain) -> None:
        if drain in self._sources:
            self._sources.remove(drain)

    def inc(self, counter, amount: float = 1.0) -> None:
        with self._lock:
            self._counts[counter] = self._counts.get(counter, 0.0) + amount

    def observe(self, histogram, value: float) -> None:
        with self._lock:
            found = self._observed.get(histogram)
            if found is None:
                self._observed[histogram] = [value]
            else:
                found.append(value)

    def observe_all(self, histogram, values: Iterable[float]) -> None:
        with self._lock:
            self._observed.setdefault(histogram, []).extend(values)

    def set(self, gauge, value: float) -> None:
        with self._lock:
            self._gauges[gauge] = value

    def flush(self) -> None:
        """Write everything gathered since the last flush."""
        for drain in list(self._sources):
            try:
                drain()
            except Exception:  # one source's failure must not stop every metric
                log.exception("a metrics source failed to hand over its figures")
        with self._lock:
            counts, self._counts = self._counts, {}
            observed, self._observed = self._observed, {}
            gauges, self._gauges = self._gauges, {}
        for counter, amount in counts.items():
            counter.inc(amount)
        for histogram, values in observed.items():
            observe_many(histogram, np.asarray(values, dtype=np.float64))
        for gauge, value in gauges.items():
            gauge.set(value)

    def start(self) -> MetricBuffer:
        """Flush every ``interval`` seconds on a daemon thread (once per process)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="metrics", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self.flush()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()


#: The process's buffer; the service starts it, and a scrape flushes it first
#: (``monitoring.scrape.ScrapeEndpoint``).
BUFFER = MetricBuffer()
