"""The command line: --help on every command, and no TensorFlow just to start it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO, assert_one_line_error, run_cli

COMMANDS = [
    "train", "export", "register", "serve", "score", "drift", "explain",
    "versions", "shadow", "promote", "rollback", "pin",
]  # fmt: skip


def test_top_level_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout and "--help" in result.stdout
    assert "<bool>" not in result.stdout  # flags take no value


def test_every_option_of_every_command_says_what_it_does():
    """`imgclf serve --help` showed --model, --port and --host bare (issue 36)."""
    from imgclf.cli import command

    group = command()
    bare = [
        f"{name} {param.name}"
        for name, each in group.commands.items()
        for param in each.params
        if param.name != "help" and not getattr(param, "help", None)
    ]
    assert not bare
    shown = run_cli("serve", "--help", env={"COLUMNS": "200"}).stdout
    for text in ("HTTP port.", "Interface to listen on.", "Published model directory"):
        assert text in shown


def test_usage_errors_exit_2_as_documented():
    """click's usage errors (an unknown option, a missing argument, a value of the wrong
    type) exit 2, a mistake the command finds itself 1; the docs say so (issue 36)."""
    usage_errors = [
        ("score", "images", "--model", "m", "--output", "x.csv", "--bogus"),
        ("export",),
        ("score", "images", "--model", "m", "--output", "x.csv", "--batch-size", "many"),
    ]
    for args in usage_errors:
        result = run_cli(*args)
        assert result.returncode == 2, result.stderr
        assert "Usage:" in result.stderr and "Traceback" not in result.stderr
    for page in ("docs/training.md", "docs/batch-scoring.md", "docs/reference/cli.md"):
        text = (REPO / page).read_text()
        assert "| 2 | a usage error" in text and "| 1 | a mistake" in text, page


def test_the_cli_does_not_import_tensorflow_until_a_command_needs_it():
    code = "import sys, imgclf.cli; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_version_and_mistakes_in_one_line(tmp_path):
    from serving import __version__

    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"imgclf {__version__}"
    # An output that is neither CSV nor Parquet, refused before anything is read or written.
    wrong = run_cli("score", str(tmp_path), "--model", str(tmp_path), "--output", "x.json")
    assert_one_line_error(wrong, "must end in .csv or .parquet")
    assert not (tmp_path / "x.json").exists()
    # A mistyped split says which splits there are, not that one is missing.
    split = run_cli(
        *("evaluate", str(tmp_path), "--run", str(tmp_path), "--split", "tst"),
        *("--output", str(tmp_path / "e")),
    )
    assert_one_line_error(split, "--split must be train, validation or test, got 'tst'")


def test_version_commands_refuse_mistakes_in_one_line(tmp_path):
    folder = tmp_path / "repository" / "digits"
    for version in ("1", "2"):
        (folder / version).mkdir(parents=True)  # numbered folders: nothing is loaded below
    (folder / "1" / "metadata.json").write_text("{}")
    cases = [
        (("shadow", str(folder), "2", "--fraction", "1.5"), "--fraction must be in (0, 1]"),
        (("shadow", str(folder), "2", "--fraction", "0"), "--fraction must be in (0, 1]"),
        (("shadow", str(folder), "2"), "version 2 is live"),
        (("shadow", str(folder)), "give a VERSION to shadow, or --off"),
        (("promote", str(folder), "9"), "no version 9 in"),
        (("rollback", str(folder)), "no earlier live version of digits"),
        (("pin", str(folder), "1", "--latest"), "give a VERSION to pin, or --latest"),
        (("versions", str(folder / "1")), "is one version; give the model's folder"),
        (("promote", str(tmp_path), "1"), "is not a model folder"),
    ]
    for args, fragment in cases:
        assert_one_line_error(run_cli(*args), fragment)
    assert not (folder / "versions.json").exists()  # no mistake wrote anything
