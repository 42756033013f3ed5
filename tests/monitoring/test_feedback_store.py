"""The delayed-label store: two stores on one file stand for two worker processes (the real
server with two workers is tested in tests/monitoring/test_live_monitoring.py)."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest

from monitoring.feedback import FeedbackStore
from monitoring.feedback_errors import FeedbackError

CLASSES = [str(digit) for digit in range(10)]


@pytest.fixture
def open_store(tmp_path):
    opened = []

    def make(**options) -> FeedbackStore:
        store = FeedbackStore(tmp_path / "feedback.sqlite3", CLASSES, **options)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


def refused(store, items) -> FeedbackError:
    with pytest.raises(FeedbackError) as caught:
        store.label(items)
    return caught.value


def test_a_label_reaches_a_prediction_made_by_another_worker(open_store):
    first, second = open_store(), open_store()
    first.remember(["a", "b", "c"], np.array([1, 2, 3]))
    result = second.label([("a", "1"), ("b", "5")])  # found once the first worker flushed
    assert result == {"accepted": 2, "outcomes": [("1", True, 0), ("5", False, 0)]}
    summary = first.summary()
    assert summary["count"] == 2 and summary["accuracy"] == 0.5
    assert summary["per_class"]["5"]["recall"] == 0.0
    assert summary["confusion_matrix"][5][2] == 1


def test_bad_feedback_is_refused_whole_and_counts_nothing(open_store):
    store = open_store()
    store.remember(["a", "b", "c"], np.array([1, 2, 3]))
    store.label([("a", "1")])
    unknown = refused(store, [("b", "2"), ("nope", "3")])
    assert unknown.reason == "unknown_request_id"
    assert [p["index"] for p in unknown.problems] == [1]
    duplicate = refused(store, [("a", "1")])
    assert duplicate.reason == "duplicate_feedback"
    twice = refused(store, [("c", "3"), ("c", "3")])
    assert twice.reason == "duplicate_feedback" and [p["index"] for p in twice.problems] == [1]
    label = refused(store, [("b", "cat"), ("c", "3")])
    assert label.reason == "unknown_label" and label.problems[0]["request_id"] == "b"
    assert store.summary()["count"] == 1  # only the first, good call counted
    assert store.label([("b", "2"), ("c", "3")])["accepted"] == 2  # b and c were untouched


def test_the_store_never_grows_past_its_bound_and_forgets_old_predictions(open_store):
    now = [1_000_000.0]
    store = open_store(capacity=50, max_age_s=1.0, flush_interval_s=0.05, clock=lambda: now[0])
    for start in range(0, 200, 10):
        store.remember([f"p{i}" for i in range(start, start + 10)], np.zeros(10, dtype=int))
        assert store.count() <= 50
    assert store.count() == 50
    assert refused(store, [("p149", "0")]).reason == "unknown_request_id"  # evicted by newer ones
    assert store.label([("p150", "0")])["accepted"] == 1
    now[0] += 1.1  # the clock moves on: the rest are past max_age_s
    assert refused(store, [("p151", "0")]).reason == "unknown_request_id"  # expired
    store.flush()
    store._last_prune = 0  # prune now rather than within the second
    assert store.count() == 0


def test_rolling_figures_cover_the_last_window_of_labels(open_store):
    store = open_store(window=5)
    ids = [f"r{i}" for i in range(8)]
    store.remember(ids, np.arange(8) % 2)  # predicted 0, 1, 0, 1, ...
    store.label([(rid, "0") for rid in ids[:4]])  # two right, two wrong
    store.label([(rid, "1") for rid in ids[4:]])  # r5, r7 right
    summary = store.summary()
    assert summary["count"] == 5  # r3 .. r7: 1 wrong (r3), r4 wrong, r5 right, r6 wrong, r7 right
    assert summary["accuracy"] == pytest.approx(2 / 5)


def test_an_id_names_its_first_prediction_and_is_labelled_once(open_store):
    taken = []
    victim, other = open_store(on_taken=taken.append), open_store()
    victim.remember(["order-17"], np.array([4]))
    victim.flush()
    other.remember(["order-17", "order-17"], np.array([7, 7]))  # another caller, same id
    other.flush()
    assert victim.label([("order-17", "4")])["outcomes"] == [("4", True, 0)]  # the first one's
    other.remember(["order-17"], np.array([9]))  # predicting again does not clear "labelled"
    other.flush()
    assert refused(other, [("order-17", "9")]).reason == "duplicate_feedback"
    victim.remember(["order-17", "fresh"], np.array([1, 2]))
    victim.flush()
    assert taken == [1]  # counted by the worker whose prediction was not kept
    assert victim.summary()["count"] == 1


def test_a_label_is_scored_against_the_version_that_predicted(open_store):
    first, second = open_store(), open_store()
    first.remember(["a", "b"], np.array([3, 3]), 1)  # version 1 says 3 to both
    second.remember(["c", "d", "e"], np.array([3, 5, 5]), 2)  # version 2, after a switch
    result = second.label([("a", "3"), ("b", "5"), ("c", "3"), ("d", "5"), ("e", "4")])
    assert result["outcomes"] == [
        ("3", True, 1),
        ("5", False, 1),
        ("3", True, 2),
        ("5", True, 2),
        ("4", False, 2),
    ]
    live = second.summary(version=2)
    assert (live["count"], live["accuracy"]) == (3, pytest.approx(2 / 3))
    assert second.summary(version=1)["accuracy"] == pytest.approx(1 / 2)
    assert live["by_version"] == {
        "1": {"labelled": 2, "correct": 1},
        "2": {"labelled": 3, "correct": 2},
    }


def test_a_store_from_before_versions_gains_the_column(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(
            "CREATE TABLE predictions (seq INTEGER PRIMARY KEY, request_id TEXT NOT NULL UNIQUE,"
            " predicted INTEGER NOT NULL, created REAL NOT NULL, labelled INTEGER NOT NULL "
            "DEFAULT 0); CREATE TABLE outcomes (seq INTEGER PRIMARY KEY, label INTEGER NOT "
            "NULL, predicted INTEGER NOT NULL); INSERT INTO outcomes (label, predicted) "
            "VALUES (1, 1);"
        )
    store = FeedbackStore(path, CLASSES)
    try:
        store.remember(["x"], np.array([2]), 4)
        assert store.label([("x", "2")])["outcomes"] == [("2", True, 4)]
        assert store.summary()["by_version"] == {
            "0": {"labelled": 1, "correct": 1},
            "4": {"labelled": 1, "correct": 1},
        }
    finally:
        store.close()


@pytest.mark.slow
def test_workers_opening_a_new_store_at_the_same_moment_all_succeed(tmp_path):
    """Every worker of a server opens the store when it starts, all at once. Without the
    lock around the set-up, 8 processes opening a new store together failed with "database
    is locked" in about 1 round of 40 (SQLite does not wait for a concurrent switch to WAL):
    a worker that started without its store. Eight processes meet at a barrier for each of 100 new
    stores (started once: a fork per round cost 37 of this test's 40 s). They start from a
    fork server, not by forking pytest's process, which earlier tests may have left with
    threads holding locks: one such child hung, and the barrier broke, on three processes."""
    context = multiprocessing.get_context("forkserver")
    failures = context.Queue()
    barrier = context.Barrier(8)
    paths = [str(tmp_path / f"store-{round_}.sqlite3") for round_ in range(100)]
    openers = [
        context.Process(target=_open_at_once, args=(paths, barrier, failures)) for _ in range(8)
    ]
    for opener in openers:
        opener.start()
    for opener in openers:
        opener.join(timeout=120)
        assert opener.exitcode == 0
    found = []
    while not failures.empty():
        found.append(failures.get())
    assert found == []


def _open_at_once(paths: list[str], barrier, failures) -> None:
    """Open each store when the others do; a failure to open it (counted by the store, not
    raised: a worker no longer dies of it, but starts without its store) is reported."""
    for path in paths:
        barrier.wait(timeout=60)
        try:
            FeedbackStore(
                Path(path),
                CLASSES,
                on_error=lambda operation, reason, lost: failures.put((operation, reason)),
            ).close()
        except Exception as error:
            failures.put(repr(error))


@pytest.fixture
def two_workers(tmp_path):
    """Two stores on one file, as two workers hold it, each counting its file's failures."""
    errors: list[tuple] = []
    path = tmp_path / "feedback.sqlite3"
    stores = [
        FeedbackStore(path, CLASSES, on_error=lambda *e, who=who: errors.append((who, *e)))
        for who in ("first", "second")
    ]
    stores[0].remember(["a", "b"], np.array([1, 2]))
    stores[0].flush()
    stores[0]._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # what a long-running one did
    yield path, stores, errors
    for store in stores:
        store.close()


def test_a_corrupt_store_is_set_aside_and_every_worker_moves_to_the_new_one(two_workers):
    """Overwritten: a worker starting on it would have died; every worker follows one new
    file (labels made through one reach predictions made through the other), the old one kept
    beside it, the failure counted."""
    path, (first, second), errors = two_workers
    data = bytearray(path.read_bytes())
    data[:100] = b"x" * 100
    path.write_bytes(bytes(data))
    third = FeedbackStore(path, CLASSES, on_error=lambda *e: errors.append(("third", *e)))
    try:
        assert ("third", "open", "corrupt", 0) in errors
        assert list(path.parent.glob("feedback.sqlite3.corrupt-*"))
        first.remember(["c"], np.array([3]))
        first.flush()
        assert second.label([("c", "3")])["accepted"] == 1
        third.remember(["d"], np.array([4]))
        third.flush()
        assert first.label([("d", "4")])["accepted"] == 1
    finally:
        third.close()


def test_a_truncated_store_is_counted_answered_503_never_500_and_recovers(two_workers):
    path, (first, second), errors = two_workers
    os.truncate(path, 0)
    outcomes = []
    for store in (second, first, second):
        try:
            store.remember(["e"], np.array([1]))
            store.flush()
            outcomes.append(store.label([("e", "1")])["accepted"])
        except FeedbackError as error:  # refused as the store's, never a crash
            outcomes.append(error.reason)
    assert any(reason == "corrupt" for _, _, reason, _ in errors), errors
    assert set(outcomes) <= {1, "store_unavailable", "duplicate_feedback", "unknown_request_id"}
    first.remember(["f"], np.array([2]))
    first.flush()
    assert second.label([("f", "2")])["accepted"] == 1  # one store again, without a restart
    assert second.summary()["count"] >= 1


def test_a_removed_store_is_made_again_once_for_every_worker(two_workers):
    path, (first, second), _ = two_workers
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    first.remember(["g"], np.array([5]))
    first.flush()
    second.remember(["h"], np.array([6]))
    second.flush()
    assert first.label([("h", "6")])["accepted"] == 1
    assert second.label([("g", "5")])["accepted"] == 1
