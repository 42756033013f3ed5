"""docs/development.md's "Project layout" table names every module of the packages, and
only files that exist: a module added, renamed or split fails here until the table says what
it holds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import REPO

PAGE = REPO / "docs" / "development.md"
#: The packages whose every module (``__init__.py`` aside) the table names.
PACKAGES = ("serving", "monitoring", "training", "imgclf")
CODE = re.compile(r"`([^`\s]+)`")


def layout_rows(page: str) -> list[tuple[str, str]]:
    """``(path, what it holds)`` for each row of the "Project layout" section's table."""
    _, found, rest = page.partition("\n## Project layout\n")
    assert found, "docs/development.md has no '## Project layout' section"
    section = rest.split("\n## ", 1)[0]
    lines = [line.strip() for line in section.splitlines() if line.strip().startswith("|")]
    rows = [tuple(cell.strip() for cell in line.strip("|").split("|", 1)) for line in lines]
    return [row for row in rows[2:] if len(row) == 2]  # the header and its rule left out


def named_modules(rows: list[tuple[str, str]]) -> set[str]:
    """The ``.py`` files the rows name, as paths from the repository root: a path in the
    first column (``serving/service.py``); in a folder's row (``serving/web/``), each
    backticked ``name.py`` in that folder; anywhere, a backticked path with a folder in it
    (``training/export.py``)."""
    named = set()
    for path, what in rows:
        folders = [name for name in CODE.findall(path) if name.endswith("/")]
        for name in CODE.findall(path) + CODE.findall(what):
            if not name.endswith(".py"):
                continue
            if "/" in name:
                named.add(name)
            else:
                named.update(folder + name for folder in folders)
    return named


def package_modules() -> set[str]:
    return {
        path.relative_to(REPO).as_posix()
        for package in PACKAGES
        for path in (REPO / package).rglob("*.py")
        if path.name != "__init__.py"
    }


def test_the_layout_table_names_every_module_and_no_file_that_is_not_there():
    named = named_modules(layout_rows(PAGE.read_text()))
    unnamed = sorted(package_modules() - named)
    absent = sorted(name for name in named if not (REPO / name).is_file())
    problems = []
    if unnamed:
        problems.append(
            "modules the table does not name (add each to its folder's row, with what it "
            "holds):\n" + "\n".join(f"  {name}" for name in unnamed)
        )
    if absent:
        problems.append(
            "files the table names that do not exist:\n" + "\n".join(f"  {n}" for n in absent)
        )
    if problems:
        pytest.fail('docs/development.md, "Project layout":\n' + "\n".join(problems), False)


def test_the_layout_table_is_read_in_each_of_its_forms():
    page = "\n".join(
        [
            "# Development",
            "## Project layout",
            "| path | what it holds |",
            "|---|---|",
            "| `pkg/cli.py` | the `pkg` command (`pkg run`) |",
            "| `pkg/web/` | `serve.py` (`pkg serve`), `oip.py` and `oip_tensors.py`; `static/` |",
            "| `docs/` | these pages; see `pkg/core/model_dir.py` |",
            "## Running the tests",
            "| `pkg/not_in_the_table.py` | after the section |",
        ]
    )
    assert named_modules(layout_rows(page)) == {
        "pkg/cli.py",
        "pkg/web/serve.py",
        "pkg/web/oip.py",
        "pkg/web/oip_tensors.py",
        "pkg/core/model_dir.py",
    }


def test_every_module_is_found_under_the_packages():
    found = package_modules()
    assert {"serving/service.py", "serving/web/serve_command.py", "imgclf/cli.py"} <= found
    assert not any(Path(name).name == "__init__.py" for name in found)
