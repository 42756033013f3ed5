"""The ``imgclf`` command. Each sub-command is a thin wrapper over one plain function, in the
module of its kind (``training_commands``, ``serving_commands``, ``version_commands``), on
the one application of ``imgclf.app``; this module assembles them, in the order ``--help``
lists them.

Heavy imports (TensorFlow, BentoML) happen inside the commands, so ``imgclf --help`` is fast
and serving commands never load TensorFlow. A user mistake prints one line and exits 1.
"""

from __future__ import annotations

import sys

import typer

# Each module registers its commands on app as it is imported, in the order --help lists.
# isort: off
import imgclf.training_commands
import imgclf.serving_commands
import imgclf.version_commands  # noqa: F401

# isort: on
from imgclf.app import app


def command():
    """The click command behind ``app``, with on/off flags shown without a ``<bool>`` value
    they do not take."""
    group = typer.main.get_command(app)
    for each in [group, *group.commands.values()]:
        for param in each.params:
            if getattr(param, "is_flag", False):
                param.metavar = ""
        each.get_help_option = _without_metavar(each.get_help_option)  # --help, made per call
    return group


def _without_metavar(make_option):
    def help_option(ctx):
        option = make_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    return help_option


def run() -> None:
    """Console-script entry point."""
    sys.exit(command()())


if __name__ == "__main__":
    run()
