"""``imgclf serve``, ``score`` and ``drift``: the model answering, over HTTP or over a batch
of files, and what its inputs look like against its reference. No TensorFlow."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from imgclf.app import app, user_errors

#: What ``score`` and ``drift`` read: the forms batch scoring lists (``serving.batch.inputs``).
ImageSource = Annotated[
    str,
    typer.Argument(
        help="Folder (recursive), glob, text/CSV file listing images, or an s3:// gs:// "
        "file:// prefix."
    ),
]
#: The model ``score``, ``drift`` and ``explain`` run.
PublishedModel = Annotated[
    Path, typer.Option(help="Published model directory or <repository>/<name>.")
]
Provider = Annotated[str, typer.Option(help="auto, cuda or cpu.")]


def serve(
    model: Annotated[
        Optional[Path],
        typer.Option(
            help="Published model directory, or <repository>/<name>: its live version, "
            "switched while serving (imgclf promote, shadow, rollback, pin; default: the "
            "BentoML store model --bento-model)."
        ),
    ] = None,
    port: Annotated[int, typer.Option(help="HTTP port.")] = 3000,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    **settings: Any,
) -> None:
    """Serve a model over HTTP with BentoML on ONNX Runtime (wraps `bentoml serve`).

    Every serving setting is an option here and an IMGCLF_* variable; an option wins."""
    from serving.core.roles import resolve_model_dir
    from serving.web.serve_command import serve as run_server
    from serving.web.serve_command import settings_from

    if model is not None:
        # A model folder stays a folder: each worker follows its versions file.
        resolved = resolve_model_dir(model)
        settings["model_dir"] = (model if resolved.parent == model else resolved).resolve()
    if settings.get("grpc_host") is None and "IMGCLF_GRPC_HOST" not in os.environ:
        settings["grpc_host"] = host  # gRPC where HTTP listens, not on every interface
    run_server(settings_from(settings), host=host, port=port, echo=typer.echo)


def _serve_signature() -> inspect.Signature:
    """``serve``'s own parameters, then one option per serving setting (ServingSettings)."""
    from serving.web.serve_command import flag, help_text, is_flag, metavar, option_fields

    # eval_str: this module's annotations are strings, and typer reads a __signature__ as
    # it stands (a string loses its typer.Option, help text and all).
    own = [
        p
        for p in inspect.signature(serve, eval_str=True).parameters.values()
        if p.kind != p.VAR_KEYWORD
    ]
    generated = []
    for name, field in option_fields().items():
        names = [f"{flag(name)}/--no-{flag(name)[2:]}"] if is_flag(field) else [flag(name)]
        option = typer.Option(
            *names,
            help=help_text(name, field),
            show_default=False,
            metavar=None if is_flag(field) else metavar(field),
        )
        kind = Optional[bool] if is_flag(field) else Optional[str]
        generated.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[kind, option],
            )
        )
    return inspect.Signature([*own, *generated])


serve.__signature__ = _serve_signature()
app.command("serve")(user_errors(serve))


@app.command()
@user_errors
def score(
    inputs: ImageSource,
    model: PublishedModel,
    output: Annotated[
        Path, typer.Option(help="CSV file, or Parquet dataset directory (name.parquet).")
    ],
    output_format: Annotated[
        Optional[str], typer.Option("--format", help="csv or parquet (default: from --output).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per ONNX Runtime batch.")] = 64,
    workers: Annotated[
        Optional[int],
        typer.Option(help="Decoding threads (default: half the cores; ONNX Runtime the rest)."),
    ] = None,
    top_k: Annotated[int, typer.Option(help="Labels and scores kept per image.")] = 5,
    provider: Provider = "auto",
    precision: Annotated[str, typer.Option(help="fp32 or int8.")] = "fp32",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    engine: Annotated[
        str, typer.Option(help="local (this machine) or ray (a Ray cluster; the ray extra).")
    ] = "local",
    address: Annotated[
        Optional[str],
        typer.Option(
            help="Ray cluster: auto, host:port or ray://host:10001 (default: start a "
            "local one-node cluster for this job)."
        ),
    ] = None,
    actors: Annotated[
        Optional[int], typer.Option(help="Ray actors, each with one model session.")
    ] = None,
    gpus_per_actor: Annotated[
        float, typer.Option(help="GPUs per Ray actor (> 0 runs the actors on CUDA).")
    ] = 0.0,
    version: Annotated[
        Optional[int],
        typer.Option(
            help="With --model <repository>/<name>: score with this version (default: the "
            "live one)."
        ),
    ] = None,
) -> None:
    """Score many images into CSV or Parquet; resumable; writes a drift report next to it.

    Exit status: 0 every image scored, 4 finished but some files could not be read,
    130 interrupted (rerun the same command to resume), 1 a mistake in the command,
    2 a usage error."""
    from serving.batch.job import run_job
    from serving.core.releases import version_dir

    summary = run_job(
        inputs,
        version_dir(model, version),
        output,
        output_format=output_format,
        batch_size=batch_size,
        workers=workers,
        top_k=top_k,
        provider=provider,
        precision=precision,
        progress=progress,
        engine=engine,
        address=address,
        actors=actors,
        gpus_per_actor=gpus_per_actor,
    )
    typer.echo(summary.line())
    for path in summary.failures:
        typer.echo(f"  failed: {path}", err=True)
    if summary.failed > len(summary.failures):
        typer.echo(
            f"  ... and {summary.failed - len(summary.failures)} more (error column)", err=True
        )
    if summary.interrupted:
        typer.echo(f"interrupted; rerun the same command to resume into {output}", err=True)
        raise typer.Exit(130)
    if summary.drift_report is not None:
        typer.echo(f"drift: {summary.drift_status} ({summary.drift_report})")
    if summary.failed:
        raise typer.Exit(4)


@app.command()
@user_errors
def drift(
    inputs: ImageSource,
    model: PublishedModel,
    output: Annotated[Path, typer.Option(help="Where to write the JSON report.")] = Path(
        "drift_report.json"
    ),
    provider: Provider = "auto",
    fail_on: Annotated[
        str, typer.Option(help="Exit 3 at this drift level: never, warning or critical.")
    ] = "never",
) -> None:
    """Compare a set of images with the model's reference profile (PSI, JS, KS per signal)."""

    from monitoring.offline import format_report
    from serving.batch.engine import drift_report
    from serving.core.errors import ConfigError
    from serving.core.files import write_json
    from serving.core.runtime import ClassifierRuntime

    if fail_on not in ("never", "warning", "critical"):
        raise ConfigError(f"--fail-on must be never, warning or critical, got {fail_on!r}")
    from serving.batch.engine import split_cores
    from serving.batch.inputs import list_inputs

    # A mistyped input fails before the model loads, and with it ONNX Runtime's session line.
    paths = list_inputs(inputs)
    runtime = ClassifierRuntime(model, provider=provider, intra_op_threads=split_cores()[1])
    report = drift_report(runtime, inputs, paths=paths)
    write_json(output, report)
    typer.echo(format_report(report))
    typer.echo(f"report: {output}")
    levels = {"stable": 0, "warning": 1, "critical": 2}
    threshold = {"never": 99, "warning": 1, "critical": 2}[fail_on]
    if levels.get(report["status"], 0) >= threshold:
        raise typer.Exit(3)


@app.command()
@user_errors
def explain(
    images: Annotated[list[Path], typer.Argument(help="Image files to explain.")],
    model: PublishedModel,
    output: Annotated[
        Path, typer.Option(help="Folder for the overlays (<image>.explain.png) and maps.json.")
    ] = Path("explanations"),
    class_: Annotated[
        Optional[str], typer.Option("--class", help="The class to explain (default: the top-1).")
    ] = None,
    method: Annotated[
        Optional[str],
        typer.Option(
            help="cam or occlusion, as POST /explain takes it (default: cam where the version "
            "has it, else occlusion)."
        ),
    ] = None,
    provider: Provider = "auto",
) -> None:
    """Where the model looked: each image with its map laid over it, as POST /explain
    answers, written offline with the same code."""
    from serving.core.errors import ConfigError, ImgclfError
    from serving.core.explain import METHODS, as_json, explain_offline, method_for, overlay_png
    from serving.core.files import atomic_write, write_json
    from serving.core.runtime import ClassifierRuntime

    if method is not None and method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    missing = [str(path) for path in images if not path.is_file()]
    if missing:
        raise ConfigError(f"no such image file: {', '.join(missing[:5])}")
    runtime = ClassifierRuntime(model, provider=provider).verify()
    method = method_for(runtime, method)
    output.mkdir(parents=True, exist_ok=True)
    maps = {}
    for path in images:
        try:
            image = runtime.preprocess(path.read_bytes())
        except ImgclfError as error:
            raise ImgclfError(f"{path}: {error.message}") from None
        found = explain_offline(runtime, image, class_, method)
        picture = output / f"{path.stem}.explain.png"
        with atomic_write(picture, "wb") as handle:
            handle.write(overlay_png(image, found["map"]))
        maps[str(path)] = as_json(found) | {"overlay": str(picture)}
        typer.echo(
            f"{path}: {found['label']} ({found['score']:.3f}); {method} map of "
            f"{found['class']!r} -> {picture}"
        )
    write_json(output / "maps.json", {"model_version": runtime.version, "images": maps})
    typer.echo(f"maps: {output / 'maps.json'}")
