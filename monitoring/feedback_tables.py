"""The feedback store's tables: their schema, the columns a store kept by an older release
gains when it is opened, and the write transaction every change runs in. Its own module
because what the file holds is one job, and keeping the store within its bounds (the store
itself, ``monitoring.feedback``) and keeping the file healthy (``monitoring.store_file``)
are two others."""

from __future__ import annotations

import sqlite3

SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    seq INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL UNIQUE,
    predicted INTEGER NOT NULL,
    created REAL NOT NULL,
    labelled INTEGER NOT NULL DEFAULT 0,
    version INTEGER NOT NULL DEFAULT 0,
    expected REAL
);
CREATE TABLE IF NOT EXISTS outcomes (
    seq INTEGER PRIMARY KEY,
    label INTEGER NOT NULL,
    predicted INTEGER NOT NULL,
    version INTEGER NOT NULL DEFAULT 0,
    expected REAL
);
"""


def set_up(db: sqlite3.Connection) -> None:
    """The tables, and the columns a store kept by an older release lacks."""
    db.executescript(SCHEMA)
    added = {"version": "INTEGER NOT NULL DEFAULT 0", "expected": "REAL"}
    for table in ("predictions", "outcomes"):
        columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        for column, kind in added.items():
            if column not in columns:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


class Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK``. Every transaction of the store
    writes, so each takes the write lock at the start (waiting up to the connection's timeout)
    instead of failing at once when it would upgrade a read lock another worker is writing
    past."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, error, trace) -> None:
        self.db.execute("ROLLBACK" if kind else "COMMIT")
