"""What the endpoint tests share: the runtime they compare the service's answers with."""

from __future__ import annotations

import pytest

from serving.core.runtime import ClassifierRuntime


@pytest.fixture(scope="module")
def reference(published_model):
    """The published test model in-process, on the CPU: what every protocol must answer."""
    return ClassifierRuntime(published_model, provider="cpu")
