"""The command line: --help on every command, and no TensorFlow just to start it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import assert_one_line_error, run_cli

COMMANDS = ["train", "export", "register", "serve", "score", "drift"]


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
