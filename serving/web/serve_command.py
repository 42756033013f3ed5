"""``imgclf serve``: the serving settings as command-line options (generated from
``ServingSettings``, the one source of truth for names, types, defaults and help), checked by
loading the model once, then ``bentoml serve`` in place of this process."""

from __future__ import annotations

import os
import socket
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path

from pydantic.fields import FieldInfo

from serving.core.errors import ConfigError, ImgclfError
from serving.web.settings import ServingSettings
from serving.web.settings_env import ENV_PREFIX

#: Settings ``imgclf serve`` does not take as options: ``--model`` resolves a repository or a
#: version folder into ``model_dir``; a secret on a command line shows in every process
#: listing, so ``IMGCLF_FEEDBACK_TOKEN`` is read from the environment only.
NOT_OPTIONS = frozenset({"model_dir", "feedback_token"})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def option_fields() -> dict[str, FieldInfo]:
    """The settings that are options of ``imgclf serve``, in declaration order."""
    return {k: v for k, v in ServingSettings.model_fields.items() if k not in NOT_OPTIONS}


def is_flag(field: FieldInfo) -> bool:
    return field.annotation is bool


def metavar(field: FieldInfo) -> str:
    """``auto|cuda|cpu`` for a choice, else the value's type in capitals."""
    kind = field.annotation
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None: X
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if typing.get_origin(kind) is typing.Literal:
        return "|".join(map(str, typing.get_args(kind)))
    if typing.get_origin(kind) is tuple:
        return "N,N,..."
    return getattr(kind, "__name__", "VALUE").upper()


def help_text(name: str, field: FieldInfo) -> str:
    default = field.default
    shown = "none" if default is None else str(default).lower() if is_flag(field) else default
    description = (field.description or "").rstrip(".")
    return f"{description}. (env {ENV_PREFIX}{name.upper()}, default {shown})".lstrip(". ")


def settings_from(
    options: Mapping[str, object], environ: Mapping[str, str] | None = None
) -> ServingSettings:
    """``IMGCLF_*`` variables, overridden by the options given (None: not given)."""
    environ = os.environ if environ is None else environ
    given = {
        ENV_PREFIX + name.upper(): str(value).lower() if isinstance(value, bool) else str(value)
        for name, value in options.items()
        if value is not None
    }
    try:
        return ServingSettings.from_env(
            {**{k: v for k, v in environ.items() if k.startswith(ENV_PREFIX)}, **given}
        )
    except ConfigError as error:  # name the option the user typed, not its variable
        message = error.message
        for name in options:
            variable = ENV_PREFIX + name.upper()
            if variable in given and variable in message:
                message = message.replace(variable, flag(name))
        raise ConfigError(message) from None


def serve(settings: ServingSettings, *, host: str, port: int, echo=print) -> typing.NoReturn:
    """Refuse to start on a model the server could not load or a port it could not listen on
    (one line now, not a crash in every worker), print how to call it, then exec ``bentoml
    serve`` (through ``serving.web.launch``)."""
    import serving

    check_port_free(host, port)  # first: a busy port's line is all the user sees
    if settings.grpc_port is not None:
        check_port_free(settings.grpc_host, settings.grpc_port, option="--grpc-port")
    if settings.model_dir is not None:
        directory = settings.model_dir
    else:
        from serving.registry import stored_model_path

        directory = stored_model_path(settings.bento_model)
    runtime = first_loadable(directory, settings)
    base = f"http://{host}:{port}"
    example = Path(serving.__file__).resolve().parent.parent / "examples" / "digit-3.png"
    image = example if example.exists() else Path("digit.png")
    echo(
        f"serving {runtime.summary()} ({directory})\n"
        f"  curl -F image=@{image} {base}/predict\n"
        f"  curl -F images=@{image} -F images=@{image} '{base}/predict_batch?top_k=3'\n"
        f"  curl {base}/metadata    curl {base}/readyz    curl {base}/metrics"
        + (
            f"\n  gRPC (Open Inference Protocol): {settings.grpc_host}:{settings.grpc_port}"
            if settings.grpc_port is not None
            else ""
        )
    )
    sys.stdout.flush()
    env = {**os.environ, **settings.to_env()}
    if settings.model_dir is None:
        env.pop(ENV_PREFIX + "MODEL_DIR", None)
    working_dir = str(Path(serving.__file__).resolve().parent.parent)
    # Through serving.web.launch: this server's metrics and feedback live in a folder of
    # their own, whatever other server runs or starts on this host.
    args = [sys.executable, "-m", "serving.web.launch", "serve", "serving.service:ImageClassifier"]
    args += ["--port", str(port), "--host", host, "--working-dir", working_dir]
    os.execve(sys.executable, args, env)


def first_loadable(directory: Path, settings: ServingSettings):
    """The runtime the workers will start on, loaded as they will load it: a model folder
    that follows its newest version skips a newest version that does not load (with one
    line), as its workers do; anything else must load."""
    from serving.core.model_dir import is_model_root
    from serving.core.roles import load_live, read_state
    from serving.core.runtime import ClassifierRuntime

    def load(path: Path) -> ClassifierRuntime:
        return ClassifierRuntime.from_settings(path, settings)

    def refused(version: int, reason: str) -> None:
        print(f"warning: version {version} refused: {reason}", file=sys.stderr)

    if not is_model_root(directory):
        return load(directory)
    return load_live(directory, read_state(directory), load, refused)


def check_servable(settings: ServingSettings, directory: Path) -> None:
    """In a server's main process, before its workers start (``bentoml serve`` of a Bento, a
    container): the model they will start on loads and the gRPC port is free, or one
    ``error:`` line and exit 1,
    instead of workers failing one after the other behind a silent port. On the CPU and at
    one batch size: a check, not the serving. ``imgclf serve`` checked it already."""
    from serving.web.supervision import SERVER_PID_VARIABLE

    if os.environ.get(SERVER_PID_VARIABLE):  # started by imgclf serve, which checked
        return
    light = settings.model_copy(
        update={
            "provider": "cpu",
            "max_batch_size": 1,
            "batch_buckets": None,
            "session_mode": "shared",
        }
    )
    try:
        if settings.grpc_port is not None:  # its workers share it (SO_REUSEPORT): no other's
            check_port_free(settings.grpc_host, settings.grpc_port, option="IMGCLF_GRPC_PORT")
        first_loadable(directory, light)
    except ImgclfError as error:
        print(f"error: {error.message}", file=sys.stderr)
        raise SystemExit(1) from None


def check_port_free(host: str, port: int, option: str = "--port") -> None:
    """One readable line, before any worker starts, when another process holds the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ConfigError(
                f"cannot listen on {host}:{port} ({error.strerror or error}); another server "
                f"may hold it: choose another {option}"
            ) from None


if __name__ == "__main__":  # `make run` checks its port before minutes of training
    try:
        check_port_free(sys.argv[1], int(sys.argv[2]))
    except ImgclfError as error:
        sys.exit(f"error: {error.message}")
