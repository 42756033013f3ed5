"""The test artefacts' cache (``tests/model_cache.py``): built once, never stale, never half
written."""

from __future__ import annotations

import pytest

from tests import model_cache


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLF_TEST_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_an_artefact_is_built_once_and_read_after(cache):
    builds = []

    def build(folder):
        builds.append(folder)
        (folder / "model.bin").write_bytes(b"weights")

    first = model_cache.cached("thing", {"epochs": 1}, build)
    again = model_cache.cached("thing", {"epochs": 1}, build)
    other = model_cache.cached("thing", {"epochs": 2}, build)
    assert first == again != other and len(builds) == 2
    assert (first / "model.bin").read_bytes() == b"weights"


def test_an_interrupted_or_invalid_artefact_is_built_again(cache):
    def failing(folder):
        (folder / "half.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        model_cache.cached("thing", {}, failing)
    assert not [p for p in cache.iterdir() if p.is_dir()]  # nothing half-written is kept
    builds = []
    model_cache.cached("thing", {}, lambda folder: builds.append(folder))
    model_cache.cached("thing", {}, lambda folder: builds.append(folder), valid=lambda f: False)
    assert len(builds) == 2


def test_the_key_changes_with_any_line_of_the_code_that_builds(tmp_path, monkeypatch):
    source = tmp_path / "training" / "train.py"
    source.parent.mkdir()
    source.write_text("EPOCHS = 1\n")
    monkeypatch.setattr(model_cache, "REPO", tmp_path)
    monkeypatch.setattr(model_cache, "SOURCES", ("training",))
    model_cache.code_fingerprint.cache_clear()
    before = model_cache.key_of("run", {"epochs": 1})
    source.write_text("EPOCHS = 2\n")
    model_cache.code_fingerprint.cache_clear()
    after = model_cache.key_of("run", {"epochs": 1})
    model_cache.code_fingerprint.cache_clear()
    assert before != after
