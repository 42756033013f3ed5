"""The scratch clone the page tests run in."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import exported_digits
from tests.docs.runbook import Scratch


@pytest.fixture(scope="session")
def digits_model_int8(digits_run) -> Path:
    """``digits_run`` exported with ``--int8``, as the export page does."""
    return exported_digits(digits_run, "--int8")


@pytest.fixture
def scratch(request, tmp_path, digits_home, digits_run, digits_model):
    """A clone as ``make run`` leaves it (no server yet: a page test starts make run's),
    whose exports of the digits run come from the model cache (the README's export runs)."""
    folder = Scratch.after_make_run(tmp_path, digits_home, digits_run, digits_model)
    folder.cached_exports = {
        False: lambda: digits_model,
        True: lambda: request.getfixturevalue("digits_model_int8"),
    }
    yield folder
    folder.stop()
