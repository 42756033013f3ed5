"""The reference pages in docs/reference/ are generated from the code: regenerating them
changes nothing, and every relative link in the docs points to a file that exists."""

from __future__ import annotations

import re

import pytest

from imgclf import reference
from serving.web.settings import ServingSettings
from tests.conftest import REPO


@pytest.mark.parametrize("name", sorted(reference.PAGES))
def test_reference_page_is_what_the_code_generates(name):
    on_disk = (reference.FOLDER / name).read_text()
    assert on_disk == reference.PAGES[name](), (
        f"docs/reference/{name} is stale: run `make docs` and commit the result"
    )


def test_every_setting_and_metric_is_documented():
    settings = (reference.FOLDER / "settings.md").read_text()
    for name in ServingSettings.model_fields:
        assert f"`IMGCLF_{name.upper()}`" in settings
    metrics = (reference.FOLDER / "metrics.md").read_text()
    assert "`imgclf_requests_total`" in metrics and "`imgclf_drift_psi`" in metrics


def test_relative_links_in_the_docs_resolve():
    pages = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken
