"""The scratch clone the page tests run in."""

from __future__ import annotations

import pytest

from tests.docs.runbook import Scratch


@pytest.fixture
def scratch(tmp_path, digits_home, digits_run, digits_model):
    """A clone as ``make run`` leaves it (no server yet: a page test starts make run's)."""
    folder = Scratch.after_make_run(tmp_path, digits_home, digits_run, digits_model)
    yield folder
    folder.stop()
