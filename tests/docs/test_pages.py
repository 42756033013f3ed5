"""The docs run: every code block of the README and docs/ is marked for the page tests
(``test_pages_*.py``, one page each, in the order of docs/index.md) or says why it is not
run; and what the documented commands write is not for git. ``tests/docs/runbook.py`` says
how a block runs and what it substitutes."""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import REPO
from tests.docs.runbook import PAGES, blocks

#: The pages whose ``run`` blocks a page test (or test_readme.py) runs.
RUN_BY_A_TEST = {
    "README.md",
    "docs/training.md",
    "docs/export.md",
    "docs/serving.md",
    "docs/releasing.md",
    "docs/open-inference-protocol.md",
    "docs/explain.md",
    "docs/batch-scoring.md",
    "docs/monitoring.md",
    "docs/several-servers.md",
}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_code_block_says_whether_a_test_runs_it(page):
    """A block is run by its page's test or says why it cannot be (``docs-test: skip:``);
    a page with blocks to run has a test that runs them."""
    found = blocks(page)
    unmarked = [block.where for block in found if block.marker is None]
    assert not unmarked, f"mark each block <!-- docs-test: run --> or skip: WHY: {unmarked}"
    name = str(page.relative_to(REPO))
    if any(block.marker == "run" for block in found):
        assert name in RUN_BY_A_TEST, f"{name} has blocks to run but no test runs them"


#: What the documented commands write at the repository root (the page tests above see them
#: appear in their scratch copy): none of it is for git.
WRITTEN_BY_THE_DOCS = [
    "runs/digits-v2/best.keras", "model_repository/second/1/model.onnx", "scores.csv",
    "scores.csv.drift.json", "scores.parquet", "scores.parquet.drift.json", "listed.csv",
    "listed.csv.drift.json", "ray-scores.parquet", "ray-scores.parquet.drift.json", "paths.txt",
    "drift.json", "eval/evaluation.json", "eval-test/evaluation.json",
    "monitoring/prometheus/local.yml", "explanations/maps.json", "digit-3-as-8.png",
]  # fmt: skip


def test_what_the_documented_commands_write_is_ignored_by_git():
    paths = [str(REPO / name) for name in WRITTEN_BY_THE_DOCS]
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *paths], cwd=REPO, capture_output=True, text=True
    ).stdout.split()
    assert sorted(set(paths) - set(ignored)) == []
