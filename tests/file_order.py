"""The order in which ``make test`` hands test files to its two processes: the longest first.

``--dist loadfile`` gives each worker whole files, one after another, as it frees up; by
default pytest-xdist hands out the files with the most tests first, and a long file with few
tests (the release faults: 14 tests, 100 s) came last, so that one process worked on for
over a minute while the other had finished. Handed out longest first (the classic
longest-processing-time rule), both finish within a few seconds of each other.

How long each file takes is kept in ``tests/durations.json`` (seconds per file, rounded),
written from a run of the whole suite by ``make test-durations``. A file it does not know
yet (a new one) goes after the known ones: most new files are short, and a wrong guess
costs only balance, never a test.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DURATIONS = REPO / "tests" / "durations.json"
#: Set (to anything) to write ``DURATIONS`` at the end of the run (``make test-durations``).
RECORD = "IMGCLF_RECORD_DURATIONS"


def file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def known_durations() -> dict[str, float]:
    try:
        return json.loads(DURATIONS.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def longest_first(items: list[pytest.Item]) -> None:
    """Sort ``items`` in place by their file's known duration, longest first; the tests of
    a file keep their order (the sort is stable)."""
    seconds = known_durations()
    items.sort(key=lambda item: -seconds.get(file_of(item.nodeid), 0.0))


class DurationRecorder:
    """Adds up each file's setup, call and teardown seconds as their reports arrive (from
    every xdist worker, in the controller), and writes them when the session ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[file_of(report.nodeid)] += report.duration

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if hasattr(session.config, "workerinput") or not self.seconds:
            return  # a worker: the controller writes
        recorded = {
            name: value
            for name, value in known_durations().items()
            if (REPO / name).exists()  # forget files removed since
        } | {name: round(value, 1) for name, value in self.seconds.items()}
        temporary = DURATIONS.with_suffix(".tmp")
        temporary.write_text(json.dumps(dict(sorted(recorded.items())), indent=1) + "\n")
        os.replace(temporary, DURATIONS)
