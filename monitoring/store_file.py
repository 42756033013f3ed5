"""The feedback store's SQLite file, kept healthy under the faults of a disk: every worker of
every server on one path opens it at once, follows it when it is removed or replaced, and sets
it aside and starts a new one when it is corrupt, so that they all converge on one file and
never split the store in two.

What fails is said by a reason (``reason_of``), for metrics and for the status a caller gets:
``disk_full``, ``corrupt``, ``io_error``, ``busy``, ``read_only``, ``cannot_open``, ``other``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

#: SQLite's primary result codes (``sqlite3.Error.sqlite_errorcode & 0xFF``) by reason.
_REASONS = {
    13: "disk_full",  # SQLITE_FULL
    11: "corrupt",  # SQLITE_CORRUPT
    26: "corrupt",  # SQLITE_NOTADB: truncated or overwritten
    10: "io_error",  # SQLITE_IOERR
    5: "busy",  # SQLITE_BUSY
    6: "busy",  # SQLITE_LOCKED
    8: "read_only",  # SQLITE_READONLY
    14: "cannot_open",  # SQLITE_CANTOPEN
}
REASONS = (*dict.fromkeys(_REASONS.values()), "other")
#: The first bytes of every SQLite database file.
SQLITE_HEADER = b"SQLite format 3\x00"


def reason_of(error: BaseException) -> str:
    if "no such table" in str(error):  # truncated to nothing: an empty database
        return "corrupt"
    code = getattr(error, "sqlite_errorcode", None)
    return _REASONS.get(code & 0xFF, "other") if code is not None else "other"


@contextlib.contextmanager
def _opening(path: Path):
    """Held while a process sets the store up or replaces it: every worker of a server opens
    it at the same moment, and SQLite answers a second switch to WAL while the first one runs
    with "database is locked" at once, without waiting (its busy timeout does not cover it):
    a worker then died at start in about 1 of 20 starts. A lock on a file beside the store,
    taken by one process at a time (``flock``: on local filesystems; on NFS where the server
    supports it), makes the set-up one after the other."""
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class StoreFile:
    """One process's connection to the store at ``path``, set up by ``set_up(db)`` (schema,
    migrations) whenever a file is opened or created. ``connection()`` at the start of each
    operation: it follows the file at ``path``, whatever happened to it since."""

    def __init__(
        self,
        path: Path,
        set_up: Callable[[sqlite3.Connection], None],
        on_set_aside: Callable[[str], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self._set_up = set_up
        #: Told the reason whenever this process sets a file aside.
        self.on_set_aside = on_set_aside
        self.db: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None

    def connection(self) -> sqlite3.Connection:
        """The connection to the file now at ``path``: opened when there is none, reopened
        when the file was removed or replaced (by another worker that found it corrupt), a
        corrupt file set aside for a new one. ``sqlite3.Error`` when none can be had now."""
        if self.db is not None and self._stat() != self._identity:
            log.error(
                "the feedback store %s was removed or replaced; opening the file now there "
                "(predictions and labels kept only in the old one are lost)",
                self.path,
            )
            self.close()
        elif self.db is not None and not self._looks_like_sqlite():
            # Truncated or overwritten under a connection that would go on using its cache
            # and journal, as if nothing happened, until its next checkpoint.
            self.set_aside("corrupt")
        if self.db is None:
            with _opening(self.path):
                try:
                    self.db = self._connect()
                except sqlite3.Error as error:
                    if reason_of(error) != "corrupt":
                        raise
                    self._move_aside("corrupt")
                    self.db = self._connect()
                self._identity = self._stat()
        return self.db

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            self._set_up(db)
            db.execute("PRAGMA synchronous=OFF")
            # Caller-chosen ids land all over the id index (the service's own UUIDv7 ids
            # append): keep it in memory (a full store of 100,000 predictions is about 12 MB),
            # read through a memory map rather than a system call per page (several
            # microseconds each in a sandboxed container).
            db.execute("PRAGMA cache_size=-65536")
            db.execute("PRAGMA mmap_size=268435456")
        except BaseException:
            db.close()
            raise
        return db

    def _looks_like_sqlite(self) -> bool:
        try:
            with open(self.path, "rb") as handle:
                return handle.read(len(SQLITE_HEADER)) == SQLITE_HEADER
        except FileNotFoundError:
            return True  # removed: the identity check reopens it

    def _stat(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return stat.st_dev, stat.st_ino

    def set_aside(self, reason: str) -> None:
        """The file in use turned out corrupt: move it aside, unless another worker did
        already; the next ``connection()`` starts a new one."""
        with _opening(self.path):
            if self._stat() == self._identity:  # still the broken one
                self._move_aside(reason)
        self.close()

    def _move_aside(self, reason: str) -> None:
        """Rename the file at ``path`` and its journal (the caller holds the lock)."""
        moved = self.path.with_name(f"{self.path.name}.{reason}-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.rename(f"{self.path}{suffix}", f"{moved}{suffix}")
        log.error(
            "the feedback store %s is %s; moved to %s, a new one starts: the predictions "
            "waiting for labels and the labelled window are lost",
            self.path,
            reason,
            moved.name,
        )
        if self.on_set_aside is not None:
            self.on_set_aside(reason)

    def close(self) -> None:
        if self.db is not None:
            with contextlib.suppress(sqlite3.Error):
                self.db.close()
            self.db = None
