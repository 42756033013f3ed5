"""The ``imgclf`` Typer application: its options, logging set-up and the one rule every
command follows (``user_errors``: a user's mistake prints one line and exits 1). The
commands register themselves on ``app`` from their own modules; ``imgclf.cli`` assembles
them."""

from __future__ import annotations

import functools
import logging
import os
from typing import Annotated

import typer

app = typer.Typer(
    name="imgclf",
    help="Train, export, serve and monitor image classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def user_errors(command):
    """Turn the project's user-facing errors into one line on stderr and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from serving.core.errors import ImgclfError

        try:
            return command(*args, **kwargs)
        except ImgclfError as error:
            typer.echo(f"error: {error.message}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


#: Set by ``imgclf --verbose``: TensorFlow's native start-up lines are shown too.
VERBOSE = {"on": False}


def quiet_native_logs():
    """TensorFlow's and absl's native start-up lines hidden, unless --verbose."""
    from contextlib import nullcontext

    from imgclf.quiet import native_log_filter

    return nullcontext() if VERBOSE["on"] else native_log_filter()


def _print_version(asked: bool) -> None:
    if asked:
        from serving import __version__

        typer.echo(f"imgclf {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    VERBOSE["on"] = verbose
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not verbose:  # the converters' INFO chatter; our own lines stay
        for chatty in ("tensorflow", "tf2onnx", "onnxruntime", "absl", "PIL", "matplotlib"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
