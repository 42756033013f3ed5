"""A worker and the processes around it: it dies with the server's main process, and it
reports the workers that died before it.

``bentoml serve`` is one main process (BentoML's process manager, circus) and one process per
worker, each in a process group of its own. The manager replaces a worker that dies, but
says nothing about it, and the dead worker's gauges stay in the metrics folder. So every
worker keeps a card (its pid and start time) in the server's runtime folder while it runs;
a worker that starts and finds the card of a process that is gone claims it (one rename, so
exactly one worker does), logs the death, counts it in ``imgclf_worker_deaths_total`` and
removes the dead process's gauge files. Its counters and histograms stay: they are totals.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

#: Set by ``serving.web.launch`` to the main process's pid, for the worker to check that its
#: parent has not died before the worker asked to die with it.
SERVER_PID_VARIABLE = "IMGCLF_SERVER_PID"
_PR_SET_PDEATHSIG = 1


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

    def __init__(self, folder: Path, pid: int | None = None) -> None:
        self.metrics_folder = Path(folder)
        self.folder = self.metrics_folder / "imgclf-workers"
        self.pid = pid or os.getpid()

    def join(self) -> list[int]:
        """Claim the cards of dead workers (removing their gauges), then lay down this
        worker's own; the pids of the dead."""
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
            dead.append(facts["pid"])
        own = self.folder / f"{self.pid}.json"
        partial = own.with_suffix(".tmp")
        created = psutil.Process(self.pid).create_time()
        partial.write_text(json.dumps({"pid": self.pid, "created": created}))
        partial.replace(own)
        return dead

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
