"""A worker and the processes around it: it dies with the server's main process, and it
reports the workers that died before it.

``bentoml serve`` is one main process (BentoML's process manager, circus) and one process per
worker, each in a process group of its own. The manager replaces a worker that dies, but
says nothing about it, and the dead worker's gauges stay in the metrics folder. So every
worker keeps a card (its pid and start time) in the server's runtime folder while it runs;
a worker that starts and finds the card of a process that is gone claims it (one rename, so
exactly one worker does), logs the death, counts it in ``imgclf_worker_deaths_total`` and
removes the dead process's gauge files. Its counters and histograms stay: they are totals.
The card also says whether its worker is ready, so that any worker can tell how many of the
server's workers serve (``census``, in ``/readyz`` and ``/metadata``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

#: Set by ``serving.web.launch`` to the main process's pid, for the worker to check that its
#: parent has not died before the worker asked to die with it.
SERVER_PID_VARIABLE = "IMGCLF_SERVER_PID"
_PR_SET_PDEATHSIG = 1


#: Set in every Bento image; BentoML 1.4.40's process manager then never replaces a dead worker
#: (``bentoml.serving.create_watcher``: ``respawn=not running_inside_container()``).
CONTAINER_VARIABLE = "BENTOML_CONTAINERIZED"


def replace_dead_workers() -> None:
    """Have the server replace a worker that dies, in a container as anywhere else.

    Inside a container BentoML leaves a dead worker dead, expecting the orchestrator to
    restart the container; but the container's main process lives on with one worker fewer,
    so no orchestrator ever does (a worker killed in a two-worker container left it serving
    on one, for good, while ``/readyz`` said ready). Call it in the server's main process
    before the workers' watcher is made: the service's ``on_deployment`` hook, which BentoML
    runs just there. The container test kills a worker and waits for its replacement.
    """
    os.environ.pop(CONTAINER_VARIABLE, None)


def die_with_server() -> bool:
    """Linux: have the kernel send this worker SIGTERM when the process that started it
    exits, so that a SIGKILL of the main process (killing its process group does not reach
    the workers) never leaves workers serving the port as orphans. False elsewhere."""
    if sys.platform != "linux":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("cannot ask to die with the server (prctl: errno %d)", ctypes.get_errno())
        return False
    expected = os.environ.get(SERVER_PID_VARIABLE)
    if expected and os.getppid() != int(expected):  # it died before we asked
        os.kill(os.getpid(), signal.SIGTERM)
    return True


class WorkerRoll:
    """The cards of a server's live workers, in ``folder`` (the server's runtime folder)."""

    def __init__(self, folder: Path, pid: int | None = None, workers: int = 1) -> None:
        self.metrics_folder = Path(folder)
        self.folder = self.metrics_folder / "imgclf-workers"
        self.pid = pid or os.getpid()
        #: The server's configured worker count.
        self.workers = workers
        self._created = 0.0
        self.failed_before = 0

    def join(self) -> list[dict]:
        """Claim the cards of dead workers (removing their gauges), then lay down this
        worker's own; the dead workers' cards (``failed``: why one could not start)."""
        self.folder.mkdir(exist_ok=True)
        dead = []
        for card in sorted(self.folder.glob("*.json")):
            try:
                facts = json.loads(card.read_text())
            except (OSError, ValueError):
                continue  # being written or claimed by another worker
            if _alive(facts["pid"], facts["created"]):
                continue
            claimed = card.with_suffix(".claimed")
            try:
                card.rename(claimed)
            except FileNotFoundError:
                continue  # another worker claimed it first
            for gauge in self.metrics_folder.glob(f"gauge_*_{facts['pid']}.db"):
                gauge.unlink(missing_ok=True)
            claimed.unlink(missing_ok=True)
            dead.append(facts)
        #: Start-ups that failed in a row before this one.
        self.failed_before = max((card.get("attempt", 0) for card in dead), default=0)
        self._created = psutil.Process(self.pid).create_time()
        self.mark(ready=False)
        return dead

    @contextlib.contextmanager
    def starting(self) -> Iterator[None]:
        """Around a worker's start: if it fails, say why on the card (``failed``), wait,
        and let the error end the worker."""
        try:
            yield
        except Exception as error:
            reason = getattr(error, "message", None) or f"{type(error).__name__}: {error}"
            wait_s = self.failed(reason)
            log.exception("this worker cannot start (%s); exiting in %.0f s", reason, wait_s)
            time.sleep(wait_s)
            raise

    def failed(self, reason: str) -> float:
        """This worker cannot start: say why on its card (its replacement reports it as a
        failed start, not a death); the seconds to wait before exiting, doubling with each
        failure in a row up to a minute, so that a server that cannot start retries calmly."""
        attempt = self.failed_before + 1
        self._write({"ready": False, "failed": reason, "attempt": attempt})
        return float(min(60, 2 ** (attempt - 1)))

    def mark(self, ready: bool) -> None:
        """Lay down (or rewrite) this worker's card, saying whether it is ready."""
        self._write({"ready": ready})

    def _write(self, facts: dict) -> None:
        own = self.folder / f"{self.pid}.json"
        partial = own.with_suffix(".tmp")
        partial.write_text(json.dumps({"pid": self.pid, "created": self._created, **facts}))
        partial.replace(own)

    def census(self) -> dict:
        """``{"ready": n, "of": N}``: the workers whose process runs and who say they are
        ready, of the server's configured count."""
        ready = 0
        for card in self.folder.glob("*.json"):
            try:
                facts = json.loads(card.read_text())
            except (OSError, ValueError):
                continue  # being claimed by another worker
            ready += bool(facts.get("ready")) and _alive(facts["pid"], facts["created"])
        return {"ready": ready, "of": self.workers}

    def leave(self) -> None:
        """This worker is shutting down as asked: not a death."""
        (self.folder / f"{self.pid}.json").unlink(missing_ok=True)


def _alive(pid: int, created: float) -> bool:
    """The same process still runs (a recycled pid has another start time)."""
    try:
        process = psutil.Process(pid)
        return (
            abs(process.create_time() - created) < 0.01 and process.status() != psutil.STATUS_ZOMBIE
        )
    except psutil.Error:
        return False
