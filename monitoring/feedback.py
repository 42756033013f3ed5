"""Delayed labels: predictions wait in a bounded store until their true label arrives, and
the labelled ones give production accuracy and per-class recall.

The service's workers are separate processes and a label may reach any of them, so the
store is one SQLite file that they share (in the server's runtime folder, which BentoML
empties at every start: the store lives as long as the server). It keeps a request id, the
predicted class and the time of each of the last ``capacity`` predictions, never an image,
and forgets predictions older than ``max_age_s``. An id names the first prediction made
under it, and can be labelled once, for as long as the store keeps that prediction. Each
worker buffers its predictions and writes them in one transaction every
``flush_interval_s``, off the request path; a label for an id that is not found yet is
looked up again for up to four intervals, while the other workers write theirs.

This module is the store: remembering predictions, matching labels, keeping its bounds. Its
tables are ``monitoring.feedback_tables``; its file, kept healthy, ``monitoring.store_file``;
how it refuses feedback, ``monitoring.feedback_errors``; the figures of its labelled window,
``monitoring.performance``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from monitoring.feedback_errors import FeedbackError, refusal, unavailable
from monitoring.feedback_tables import Transaction, set_up
from monitoring.performance import labelled_figures
from monitoring.store_file import StoreFile, reason_of

log = logging.getLogger(__name__)

#: How often a worker forgets expired predictions and re-counts the store.
PRUNE_INTERVAL_S = 10.0
#: For this long after the store failed to write predictions, a label for an id it does not
#: hold is 503 (perhaps it was never written), not 404.
WRITE_FAILURE_MEMORY_S = 300.0


class FeedbackStore:
    """Predictions awaiting labels (bounded by count and age) and the last ``window``
    labelled outcomes, shared by every worker through ``path``."""

    def __init__(
        self,
        path: Path,
        classes: Sequence[str],
        *,
        capacity: int = 100_000,
        max_age_s: float = 3 * 86400,
        window: int = 1000,
        flush_interval_s: float = 0.25,
        on_count: Callable[[int], None] | None = None,
        on_taken: Callable[[int], None] | None = None,
        on_error: Callable[[str, str, int], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        #: Wall-clock seconds for prediction ages (a test passes its own clock).
        self.clock = clock
        self.classes = list(classes)
        self._index = {name: i for i, name in enumerate(self.classes)}
        self.capacity = capacity
        self.max_age_s = max_age_s
        self.window = window
        self.flush_interval_s = flush_interval_s
        self.on_count = on_count
        #: Called with the number of predictions not stored because their id was taken.
        self.on_taken = on_taken
        #: Called with (operation, reason, predictions lost) when the file fails.
        self.on_error = on_error
        self._buffer: deque[tuple[Sequence[str], Sequence[int], int, float]] = deque()
        self._db_lock = threading.Lock()
        self._file = StoreFile(
            self.path, set_up, on_set_aside=lambda reason: self._count_error("open", reason)
        )
        #: When writing last failed (``time.monotonic``), and why: see
        #: ``WRITE_FAILURE_MEMORY_S``.
        self._write_failed: tuple[float, str] | None = None
        self._logged: dict[str, float] = {}
        try:  # a store that cannot be opened now is retried by every flush; never fatal
            self._file.connection()
        except sqlite3.Error as error:
            self._failed("open", error)
        self._last_prune = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flush_loop, name="feedback", daemon=True)
        self._thread.start()

    @property
    def _db(self) -> sqlite3.Connection:
        return self._file.db

    # -- predictions -------------------------------------------------------------------

    def remember(
        self,
        request_ids: Sequence[str],
        predicted: Sequence[int],
        version: int = 0,
        expected: Sequence[float] | Callable[[], Sequence[float]] | None = None,
    ) -> None:
        """Keep these predictions (made by model ``version``, with the label-free estimate's
        ``expected`` correctness of each when there is one, or a function that gives it)
        until their labels come: one list append on the request path; the rows are built,
        and ``expected`` called, by the flushing thread."""
        self._buffer.append((request_ids, predicted, version, expected, self.clock()))

    def flush(self) -> None:
        """Write the buffered predictions, then keep the store within its bounds."""
        batches = []
        while self._buffer:
            batches.append(self._buffer.popleft())
        rows = [
            (rid, int(predicted), created, version, None if chance is None else float(chance))
            for ids, classes, version, expected, created in batches
            for rid, predicted, chance in zip(ids, classes, _expected(expected, ids), strict=True)
        ]
        with self._db_lock:
            try:
                self._write(rows)
            except sqlite3.Error as error:
                self._write_failed = (time.monotonic(), self._failed("write", error, len(rows)))

    def _write(self, rows: list) -> None:
        """Insert ``rows`` and keep the store in its bounds (the caller holds the lock)."""
        self._file.connection()
        if rows:
            with self._transaction():
                # One statement for all rows: executemany would release and take back
                # the GIL once per row, tugging at the event loop's thread each time.
                # The first prediction under an id keeps it for as long as the store
                # does: a later one under the same id (a retry, or another caller
                # choosing it) is answered but not stored, so it can neither change what
                # the first caller's label is scored against nor clear "labelled".
                before = self._db.total_changes
                self._db.execute(
                    "INSERT OR IGNORE INTO predictions "
                    "(request_id, predicted, created, version, expected) "
                    "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), "
                    "json_extract(value, '$[2]'), json_extract(value, '$[3]'), "
                    "json_extract(value, '$[4]') FROM json_each(?)",
                    (json.dumps(rows),),
                )
                taken = len(rows) - (self._db.total_changes - before)
                self._db.execute(
                    "DELETE FROM predictions WHERE seq <= (SELECT MAX(seq) FROM predictions) - ?",
                    (self.capacity,),
                )
            if taken and self.on_taken is not None:
                self.on_taken(taken)
        if time.monotonic() - self._last_prune >= PRUNE_INTERVAL_S:
            self._prune()

    def _prune(self) -> None:
        """Forget expired predictions (oldest first: sequence order is time order)."""
        cutoff = self.clock() - self.max_age_s
        with self._transaction():
            first_alive = self._db.execute(
                "SELECT seq FROM predictions WHERE created >= ? ORDER BY seq LIMIT 1", (cutoff,)
            ).fetchone()
            self._db.execute(
                "DELETE FROM predictions WHERE seq < ?",
                (first_alive[0] if first_alive else 2**62,),
            )
        self._last_prune = time.monotonic()
        if self.on_count is not None:
            self.on_count(self._count())

    def _failed(self, operation: str, error: sqlite3.Error, lost: int = 0) -> str:
        """Count and log a failure of the file (once a minute per reason), set a corrupt
        file aside; its reason."""
        reason = reason_of(error)
        self._count_error(operation, reason, lost)
        if time.monotonic() - self._logged.get(reason, -60.0) >= 60:
            self._logged[reason] = time.monotonic()
            log.error(
                "feedback store %s: %s failed (%s: %s)%s",
                self.path,
                operation,
                reason,
                error,
                f"; {lost} prediction(s) not stored" if lost else "",
            )
        if reason == "corrupt":
            try:
                self._file.set_aside(reason)
            except OSError as again:
                log.error("feedback store %s: setting it aside failed: %s", self.path, again)
        return reason

    def _count_error(self, operation: str, reason: str, lost: int = 0) -> None:
        if self.on_error is not None:
            self.on_error(operation, reason, lost)

    @contextlib.contextmanager
    def _reading(self, operation: str):
        """Under the connection's lock, on the file now at ``path``; a failure of the file is
        ``store_unavailable`` (503), never an error of the caller's."""
        with self._db_lock:
            try:
                self._file.connection()
                yield
            except sqlite3.Error as error:
                reason = self._failed(operation, error)
                raise unavailable(reason) from None

    # -- labels ------------------------------------------------------------------------

    def label(self, items: Sequence[tuple[str, str]]) -> dict:
        """Match each ``(request_id, label)`` to its prediction, all or nothing: an unknown
        label, an unknown or expired id, or an id labelled before refuses the whole call
        (``FeedbackError``, listing every bad item) and counts nothing."""
        problems = [
            {"index": i, "request_id": rid, "error": f"unknown label {label!r}"}
            for i, (rid, label) in enumerate(items)
            if label not in self._index
        ]
        if problems:
            raise FeedbackError(
                "unknown_label",
                f"labels must be class names of this model ({', '.join(self.classes[:20])})",
                problems,
            )
        self.flush()
        deadline = time.monotonic() + 4 * self.flush_interval_s
        while self._missing(items) and time.monotonic() < deadline:
            time.sleep(self.flush_interval_s)  # another worker may not have written them yet
        with self._reading("label"), self._transaction():
            outcomes, problems = self._match(items)
            failed = self._write_failed
            if (
                failed
                and time.monotonic() - failed[0] < WRITE_FAILURE_MEMORY_S
                and any(p["reason"] == "unknown_request_id" for p in problems)
            ):
                # Not known to be unknown: perhaps answered while writing failed.
                raise unavailable(failed[1])
            if problems:
                raise refusal(problems)
            self._db.executemany(
                "UPDATE predictions SET labelled = 1 WHERE seq = ?",
                [(seq,) for seq, *_ in outcomes],
            )
            self._db.executemany(
                "INSERT INTO outcomes (label, predicted, version, expected) VALUES (?, ?, ?, ?)",
                [row[1:] for row in outcomes],
            )
            self._db.execute(
                "DELETE FROM outcomes WHERE seq <= (SELECT MAX(seq) FROM outcomes) - ?",
                (self.window,),
            )
        return {
            "accepted": len(outcomes),
            "outcomes": [(self.classes[label], label == p, v) for _, label, p, v, _ in outcomes],
        }

    def _missing(self, items: Sequence[tuple[str, str]]) -> bool:
        with self._reading("label"):
            return any(
                self._db.execute(
                    "SELECT 1 FROM predictions WHERE request_id = ?", (rid,)
                ).fetchone()
                is None
                for rid, _ in items
            )

    def _match(self, items: Sequence[tuple[str, str]]):
        cutoff = self.clock() - self.max_age_s
        outcomes, problems, seen = [], [], set()
        for index, (rid, label) in enumerate(items):
            row = self._db.execute(
                "SELECT seq, predicted, created, labelled, version, expected FROM predictions "
                "WHERE request_id = ?",
                (rid,),
            ).fetchone()
            if rid in seen or (row is not None and row[3]):
                problems.append(
                    {
                        "index": index,
                        "request_id": rid,
                        "error": "already labelled",
                        "reason": "duplicate_feedback",
                    }
                )
            elif row is None or row[2] < cutoff:
                problems.append(
                    {
                        "index": index,
                        "request_id": rid,
                        "error": "no such prediction (unknown id, or older than the store keeps)",
                        "reason": "unknown_request_id",
                    }
                )
            else:
                outcomes.append((row[0], self._index[label], row[1], row[4], row[5]))
            seen.add(rid)
        return outcomes, problems

    # -- figures -----------------------------------------------------------------------

    def summary(self, version: int | None = None) -> dict:
        """Accuracy, per-class precision / recall / F1 and the confusion matrix of the last
        ``window`` labelled predictions (of ``version``'s, when given: a label is scored
        against the version that made the prediction); labelled predictions per version;
        the store's size and bounds."""
        predictions = self.count()
        with self._reading("read"):
            rows = self._db.execute(
                "SELECT label, predicted, version, expected FROM outcomes"
            ).fetchall()
        return {
            "window": self.window,
            "version": version,
            **labelled_figures(rows, self.classes, version),
            "store": {
                "predictions": predictions,
                "capacity": self.capacity,
                "max_age_s": self.max_age_s,
            },
        }

    def count(self) -> int:
        """Predictions in the store now (after writing this worker's buffer)."""
        self.flush()
        with self._reading("read"):
            return self._count()

    def _count(self) -> int:
        """Predictions in the store (the caller holds the connection's lock)."""
        return self._db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]

    # -- plumbing ----------------------------------------------------------------------

    def _transaction(self):
        return Transaction(self._db)

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            try:
                self.flush()
            except Exception:  # the thread must outlive anything (flush counts the file's)
                log.exception("writing predictions to the feedback store failed")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.flush()
        with self._db_lock:
            self._file.close()


def _expected(expected, ids: Sequence[str]) -> Sequence[float | None]:
    if expected is None:
        return [None] * len(ids)
    return expected() if callable(expected) else expected
