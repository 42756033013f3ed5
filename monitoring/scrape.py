"""The answer to a scrape of ``/metrics``: every worker's figures, this worker's up to now.

With several workers every value lives in a memory-mapped file per process, and a scrape
merges the files with prometheus_client's ``MultiProcessCollector``. A worker that is
starting creates its file before it sizes it, so for an instant the file is empty, and the
collector fails on it (``struct.error``; prometheus/client_python#1199, its fix not yet
released in 0.26): the whole scrape fails, and a worker killed in that instant (one that
cannot start, say) leaves the empty file behind for good, so that every later scrape fails
too. Under BentoML the failure was worse than an error: BentoML's request timeout waits for
an answer that an exception never sends, so the scrape hung for the whole timeout.

So each worker answers ``/metrics`` itself (BentoML's handler does the same, less the empty
files): a file with nothing written in it holds no figures, and is left out. And a worker
that replaces a dead one removes the dead one's gauges (``supervision.WorkerRoll.join``):
a file listed, then removed before it is read, failed the merge (prometheus_client forgives
that only for ``live`` gauges), so the scrape lists the files again.
"""

from __future__ import annotations

import glob
import os

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.responses import Response

from monitoring.buffer import BUFFER, MetricBuffer


def _written_files(folder: str) -> list[str]:
    """The metrics files in ``folder`` that hold at least their header (a file is removed
    when its process is marked dead: gone between the listing and now, it is left out)."""
    written = []
    for path in glob.glob(os.path.join(folder, "*.db")):
        try:
            if os.path.getsize(path) > 0:
                written.append(path)
        except OSError:
            continue
    return written


def _bucket_count_sum(sample) -> tuple:
    """Histogram samples in the order of the exposition format, as BentoML orders them:
    per label set its buckets by bound, then ``_count``, then ``_sum``."""
    labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
    if sample.name.endswith("_bucket"):
        return labels, 0, float(sample.labels.get("le", 0))
    return labels, 1 if sample.name.endswith("_count") else 2, 0.0


class WrittenFilesCollector(MultiProcessCollector):
    """prometheus_client's collector, reading only the files that hold something, as they
    are once none of them vanishes while it reads."""

    #: Listings tried before a file removed under the merge is an error after all; each
    #: removal is one dead worker's gauges, claimed once, so a second listing is enough.
    LISTINGS = 5

    def collect(self):
        for _ in range(self.LISTINGS - 1):
            try:
                return self.merge(_written_files(self._path), accumulate=True)
            except FileNotFoundError:
                continue  # a dead worker's gauges, removed between the listing and the read
        return self.merge(_written_files(self._path), accumulate=True)


def exposition(folder: str) -> bytes:
    """Every process's figures in ``folder``, in Prometheus's text format."""
    registry = CollectorRegistry()
    WrittenFilesCollector(registry, path=folder)
    for metric in registry.collect():
        if metric.type == "histogram":
            metric.samples.sort(key=_bucket_count_sum)
    return generate_latest(registry)


class ScrapeEndpoint:
    """ASGI middleware: ``GET /metrics`` answered with this worker's buffered counts written
    first, then every worker's figures; without a multiprocess folder (one process, in the
    tests) BentoML answers, after the same flush."""

    def __init__(self, app, buffer: MetricBuffer = BUFFER) -> None:
        self.app = app
        self.buffer = buffer

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/metrics":
            await self.app(scope, receive, send)
            return
        self.buffer.flush()
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if scope["method"] != "GET" or not folder:
            await self.app(scope, receive, send)
            return
        body = await anyio.to_thread.run_sync(exposition, folder)
        await Response(body, media_type=CONTENT_TYPE_LATEST)(scope, receive, send)
