"""The order make test hands files to its processes: the longest known first."""

from __future__ import annotations

import json
from types import SimpleNamespace

from tests import file_order


def test_files_go_longest_first_their_tests_in_order_unknown_files_last(monkeypatch, tmp_path):
    durations = tmp_path / "durations.json"
    durations.write_text(json.dumps({"tests/a.py": 5.0, "tests/b.py": 50.0}))
    monkeypatch.setattr(file_order, "DURATIONS", durations)
    ids = ["tests/new.py::x", "tests/a.py::one", "tests/b.py::one", "tests/a.py::two"]
    items = [SimpleNamespace(nodeid=nodeid) for nodeid in ids]
    file_order.longest_first(items)
    assert [item.nodeid for item in items] == [
        "tests/b.py::one", "tests/a.py::one", "tests/a.py::two", "tests/new.py::x"
    ]  # fmt: skip


def test_the_recorder_adds_up_each_files_phases_and_forgets_removed_files(monkeypatch, tmp_path):
    durations = tmp_path / "tests" / "durations.json"
    durations.parent.mkdir()
    (tmp_path / "tests" / "kept.py").write_text("")
    durations.write_text(json.dumps({"tests/kept.py": 3.0, "tests/removed.py": 9.0}))
    monkeypatch.setattr(file_order, "DURATIONS", durations)
    monkeypatch.setattr(file_order, "REPO", tmp_path)
    recorder = file_order.DurationRecorder()
    for nodeid, seconds in [
        ("tests/ran.py::a", 1.25),
        ("tests/ran.py::a", 0.5),
        ("tests/ran.py::b", 2),
    ]:
        recorder.pytest_runtest_logreport(SimpleNamespace(nodeid=nodeid, duration=seconds))
    recorder.pytest_sessionfinish(SimpleNamespace(config=SimpleNamespace()))
    assert json.loads(durations.read_text()) == {"tests/kept.py": 3.0, "tests/ran.py": 3.8}
