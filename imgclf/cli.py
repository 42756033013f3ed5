"""The ``imgclf`` command. Each sub-command is a thin wrapper over one plain function.

Heavy imports (TensorFlow, BentoML) happen inside the commands, so ``imgclf --help`` is fast
and serving commands never load TensorFlow. A user mistake prints one line and exits 1.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

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


#: ``imgclf train``'s exit status when the run finished but the model did not learn.
DID_NOT_LEARN = 3

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


@app.command()
@user_errors
def train(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Run directory to create (or resume).")
    ],
    config: Annotated[
        Optional[Path], typer.Option("--config", "-c", help="YAML config; flags below override it.")
    ] = None,
    dataset: Annotated[
        Optional[str], typer.Option(help="Built-in data set: digits (scikit-learn, no download).")
    ] = None,
    data: Annotated[
        Optional[Path], typer.Option(help="Image folder with one sub-folder per class.")
    ] = None,
    arch: Annotated[
        Optional[str], typer.Option(help="seed-cnn, mobilenetv2, resnet50 or vgg16.")
    ] = None,
    weights: Annotated[
        Optional[str], typer.Option(help="imagenet, none, or a local weights file.")
    ] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Maximum epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size.")] = None,
    image_size: Annotated[
        Optional[str], typer.Option(help="Model input size: 64 or 64x48 (height x width).")
    ] = None,
    learning_rate: Annotated[Optional[float], typer.Option(help="Initial learning rate.")] = None,
    seed: Annotated[
        Optional[int], typer.Option(help="Random seed for split, init, augmentation.")
    ] = None,
    set_: Annotated[
        Optional[list[str]],
        typer.Option(
            "--set", help="Override any config key: --set train.optimizer=sgd (repeatable)."
        ),
    ] = None,
    progress: Annotated[
        Optional[bool],
        typer.Option(
            "--progress/--no-progress",
            help="Keras' progress bar per epoch (default: when the output is a terminal; "
            "otherwise one line per epoch, for logs).",
            show_default=False,
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(help="Replace a finished run (or one with another config) in --output."),
    ] = False,
) -> None:
    """Train a classifier and keep the best checkpoint with its evaluation report.

    Exit status: 0 trained, 3 trained but the model did not learn (no better than chance or
    the largest class; metrics.json says so), 1 a mistake in the command."""
    from serving.core.errors import ConfigError
    from training.config import ARCHITECTURES, parse_override, resolve_config

    if config is not None and not config.is_file():
        raise ConfigError(f"config file {config} does not exist")
    if arch is not None and arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    if dataset is not None and dataset != "digits":
        raise ConfigError(f"unknown built-in data set {dataset!r}; the built-in one is digits")
    overrides: dict[str, Any] = dict(parse_override(item) for item in set_ or [])
    flags = {
        "data.dataset": dataset,
        "data.data_dir": str(data) if data else None,
        "model.arch": arch,
        "model.weights": weights,
        "train.epochs": epochs,
        "train.batch_size": batch_size,
        "data.image_size": _parse_size(image_size) if image_size else None,
        "train.learning_rate": learning_rate,
        "seed": seed,
    }
    given = {key: value for key, value in flags.items() if value is not None}
    overrides.update(given)
    if data is not None:
        overrides.setdefault("data.dataset", None)
    if dataset is not None:
        overrides.setdefault("data.data_dir", None)
    # A built-in data set brings its own recipe unless a config file is given.
    implied = ({"data.dataset"} if data else set()) | ({"data.data_dir"} if dataset else set())
    resolved, sources = resolve_config(
        config, overrides, flags=set(given) | implied, preset=dataset if config is None else None
    )

    if resolved.data.data_dir is not None:
        from training.datasets import discover

        # A mistyped folder, or a class without images, fails before TensorFlow loads (a
        # listing: a second of a hundred thousand files, against 6 s of TensorFlow's import).
        discover(resolved.data.data_dir)
    from training.run_dir import RunPaths, check_run_dir

    check_run_dir(RunPaths(output), resolved, force=force)  # and so does a wrong --output
    with quiet_native_logs():
        from training.train import train as run_training

        if progress is None:
            progress = sys.stdout.isatty()
        metrics = run_training(
            resolved, output, force=force, sources=sources, verbose=1 if progress else 2
        )
    test = metrics["test"]
    auc = "n/a" if test["macro_auc"] is None else f"{test['macro_auc']:.4f}"
    typer.echo(
        f"test accuracy {test['accuracy']:.4f}  macro F1 {test['macro_f1']:.4f}  "
        f"macro AUC {auc}  -> {output}/best.keras"
    )
    if not metrics["learning"]["learned"]:
        typer.echo(f"warning: {metrics['learning']['warning']}", err=True)
        raise typer.Exit(DID_NOT_LEARN)


@app.command()
@user_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished training run directory.")],
    repository: Annotated[
        Path, typer.Option(help="Model repository root; publishes <repository>/<name>/<version>.")
    ] = Path("model_repository"),
    name: Annotated[
        Optional[str], typer.Option(help="Model name (default: the run directory's name).")
    ] = None,
    version: Annotated[
        Optional[int], typer.Option(help="Version number (default: the next integer).")
    ] = None,
    int8: Annotated[
        bool, typer.Option("--int8", help="Also write model.int8.onnx if accuracy holds.")
    ] = False,
    int8_activations: Annotated[
        Optional[str], typer.Option(help="INT8 activation type: uint8 (x86) or int8 (ARM).")
    ] = None,
    max_batch_size: Annotated[
        int, typer.Option(help="Largest batch the parity gate checks (and serving uses).")
    ] = 64,
    register: Annotated[
        bool, typer.Option(help="Also import the model into BentoML's local model store.")
    ] = True,
    force: Annotated[bool, typer.Option(help="Replace an existing version.")] = False,
    allow_unlearned: Annotated[
        bool,
        typer.Option(
            "--allow-unlearned",
            help="Publish a run whose training said it did not learn (train's exit 3); "
            "refused without it.",
        ),
    ] = False,
) -> None:
    """Export the best checkpoint to SavedModel and ONNX, prove parity, publish a version.

    A run that did not learn (imgclf train exited 3) is refused unless --allow-unlearned."""
    from serving.core.errors import ConfigError

    if int8_activations not in (None, "uint8", "int8"):
        raise ConfigError(f"--int8-activations must be uint8 or int8, got {int8_activations!r}")
    from training.datasets import read_run

    read_run(run_dir)  # a mistyped run fails here, before TensorFlow is imported
    from training.run_dir import BEST_MODEL, check_checkpoint

    check_checkpoint(run_dir / BEST_MODEL)  # and so does a run without its checkpoint
    from serving.registry import store_versions
    from training.publish import check_learned, destination

    check_learned(run_dir, allow_unlearned=allow_unlearned)  # so does one that did not learn

    # A version new in the store too: it outlives `make clean` of the repository.
    taken = store_versions if register else None
    # A bad name or a taken version fails here too (the export checks again to publish).
    destination(run_dir, repository, name, version, force=force, taken_versions=taken)
    with quiet_native_logs():
        from training.export import export as run_export

        result = run_export(
            run_dir,
            repository,
            name=name,
            version=version,
            int8=int8,
            int8_activation_type=int8_activations,
            force=force,
            max_batch_size=max_batch_size,
            taken_versions=taken,
            allow_unlearned=allow_unlearned,
        )
    for runtime, summary in result.parity["summary"].items():
        typer.echo(
            f"parity {runtime}: max abs diff {summary['max_abs_diff']:.2e}, "
            f"top-1 agreement {summary['top1_agreement']:.2%}"
        )
    if result.int8 is not None:
        typer.echo(
            f"int8: {result.int8['decision']} (fp32 {result.int8['fp32_test_accuracy']:.4f}, "
            f"int8 {result.int8['int8_test_accuracy']:.4f})"
        )
    if register:
        import shutil

        from serving.core.errors import ImgclfError
        from serving.registry import register as register_model

        try:
            tag = register_model(result.path, replace=force)
        except ImgclfError as error:
            shutil.rmtree(result.path, ignore_errors=True)  # no half-done export behind exit 1
            raise type(error)(f"{error.message} (so {result.path} was not kept)") from error
        typer.echo(f"published {result.path}\nregistered BentoML model {tag}")
    else:
        typer.echo(f"published {result.path}")


@app.command()
@user_errors
def evaluate(
    model_dir: Annotated[
        Path, typer.Argument(help="Published model directory or <repository>/<name>.")
    ],
    output: Annotated[Path, typer.Option(help="Folder for evaluation.json and the plots.")],
    data: Annotated[
        Optional[Path],
        typer.Option(help="Labelled image folder: one sub-folder per class, named as the model's."),
    ] = None,
    run: Annotated[
        Optional[Path], typer.Option(help="A training run directory, with --split.")
    ] = None,
    split: Annotated[
        Optional[str], typer.Option(help="train, validation or test: that split of --run.")
    ] = None,
) -> None:
    """Evaluate a published model on labelled images, through the serving runtime."""
    from serving.core.errors import ConfigError
    from serving.core.roles import resolve_model_dir

    if (data is None) == (run is None):
        raise ConfigError("give either --data FOLDER or --run RUN_DIR --split test")
    if run is not None and split is None:
        raise ConfigError("--run needs --split train, validation or test")
    if run is not None and split not in ("train", "validation", "test"):
        raise ConfigError(f"--split must be train, validation or test, got {split!r}")
    if data is not None and split is not None:
        raise ConfigError("--split goes with --run, not --data")
    with quiet_native_logs():
        from training import datasets
        from training.evaluate import evaluate_published

        if data is not None:
            samples = datasets.discover(data).samples
        else:
            samples = datasets.read_manifest(run)[split]
        result = evaluate_published(resolve_model_dir(model_dir), samples, output)
    auc = "n/a" if result["macro_auc"] is None else f"{result['macro_auc']:.4f}"
    typer.echo(
        f"accuracy {result['accuracy']:.4f}  macro F1 {result['macro_f1']:.4f}  macro AUC {auc}  "
        f"ECE {result['calibration']['ece']:.4f}  on {result['count']} images "
        f"({result['unreadable_count']} unreadable) -> {output}/evaluation.json"
    )


@app.command("register")
@user_errors
def register_command(
    model_dir: Annotated[
        Path, typer.Argument(help="A published model directory (<repository>/<name>/<version>).")
    ],
    force: Annotated[bool, typer.Option(help="Replace a store entry with other files.")] = False,
) -> None:
    """Import a published model directory into BentoML's local model store."""
    from serving.core.roles import resolve_model_dir
    from serving.registry import register as register_model

    typer.echo(
        f"registered BentoML model {register_model(resolve_model_dir(model_dir), replace=force)}"
    )


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
    inputs: Annotated[
        str,
        typer.Argument(
            help="Folder (recursive), glob, text/CSV file listing images, or an s3:// gs:// "
            "file:// prefix."
        ),
    ],
    model: Annotated[Path, typer.Option(help="Published model directory or <repository>/<name>.")],
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
    provider: Annotated[str, typer.Option(help="auto, cuda or cpu.")] = "auto",
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
    inputs: Annotated[
        str,
        typer.Argument(
            help="Folder (recursive), glob, text/CSV file listing images, or an s3:// gs:// "
            "file:// prefix."
        ),
    ],
    model: Annotated[Path, typer.Option(help="Published model directory or <repository>/<name>.")],
    output: Annotated[Path, typer.Option(help="Where to write the JSON report.")] = Path(
        "drift_report.json"
    ),
    provider: Annotated[str, typer.Option(help="auto, cuda or cpu.")] = "auto",
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


ModelFolder = Annotated[
    Path, typer.Argument(help="The model's folder, <repository>/<name>, holding its versions.")
]
VersionNumber = Annotated[int, typer.Argument(help="A published version number.")]


@app.command()
@user_errors
def versions(
    model: ModelFolder,
    server: Annotated[
        Optional[str],
        typer.Option(help="A running server's URL: add what it reports for each version."),
    ] = None,
    check: Annotated[
        bool, typer.Option(help="Load each version as a server would (hashes, graph).")
    ] = True,
) -> None:
    """List a model's versions: role, test accuracy, created, whether it verifies, and with
    --server the images each answered, its shadow agreement and its refusals. Following the
    newest, the live version is the newest that verifies, as servers serve it; why a version
    does not verify is below the table."""
    from serving.core.version_report import server_figures, version_rows

    rows = version_rows(model, verify=check)
    figures = server_figures(server) if server else None
    header = f"{'version':>7}  {'role':<27} {'accuracy':>8}  {'created':<25} status"
    if figures:
        header += "  | server: answered, agreement, refused"
    typer.echo(header)
    notes: list[str] = []
    for row in rows:
        accuracy = f"{row['accuracy']:.4f}" if row["accuracy"] is not None else "-"
        status = row["status"]
        if row["reason"]:
            served = row["served"]
            following = (
                f"; servers following the newest refuse it and serve version {served}"
                if served is not None
                else ""
            )
            status += _note(notes, row["reason"] + following)
        line = (
            f"{row['version']:>7}  {row['role'] or '-':<27} {accuracy:>8}  "
            f"{row['created_at'] or '-':<25} {status}"
        )
        if figures:
            line += "  | " + _server_line(row["version"], figures, notes)
        typer.echo(line)
    if notes:
        typer.echo("")
    for note in notes:
        typer.echo(note)
    if figures and figures["metadata"].get("state_error"):
        typer.echo(f"server: {figures['metadata']['state_error']}")


def _note(notes: list[str], text: str) -> str:
    """Add ``text`` below the table, numbered; the mark that points to it, for a row."""
    notes.append(f"[{len(notes) + 1}] {text}")
    return f" [{len(notes)}]"


def _server_line(version: int, figures: dict, notes: list[str]) -> str:
    found = figures["by_version"].get(version, {})
    compared = found.get("shadow_compared", 0)
    agreement = f"{found.get('shadow_agreed', 0) / compared:.4f} of {compared}" if compared else "-"
    refusal = figures["metadata"].get("refused", {}).get(str(version))
    refused = f"refused {found['refusals']}x" if found.get("refusals") else "-"
    if refusal:
        refused = ("refused" if refused == "-" else refused) + _note(
            notes, f"server refused version {version}: {refusal}"
        )
    return f"{found.get('answered', 0)}, {agreement}, {refused}"


@app.command()
@user_errors
def shadow(
    model: ModelFolder,
    version: Annotated[
        Optional[int], typer.Argument(help="The version to shadow the live one (omit with --off).")
    ] = None,
    fraction: Annotated[
        float, typer.Option(help="Share of live requests copied to the shadow, in (0, 1].")
    ] = 1.0,
    off: Annotated[bool, typer.Option("--off", help="Stop shadowing.")] = False,
) -> None:
    """Send a copy of a fraction of live requests to another version; its answers are
    compared with the live ones (metrics, /metadata) and never returned."""
    from serving.core.errors import ConfigError
    from serving.core.releases import set_shadow

    if off == (version is not None):
        raise ConfigError("give a VERSION to shadow, or --off to stop shadowing")
    state = set_shadow(model, None if off else version, fraction)
    if state.shadow is None:
        typer.echo(f"no shadow for {model}")
    else:
        typer.echo(
            f"version {state.shadow.version} shadows {fraction:g} of the live requests of "
            f"{model}; servers follow within their poll interval"
        )


@app.command()
@user_errors
def promote(model: ModelFolder, version: VersionNumber) -> None:
    """Make a version live (checked first); the live one it replaces stays on disk, for
    imgclf rollback."""
    from serving.core.releases import promote as promote_version

    state = promote_version(model, version)
    earlier = f" (was {state.history[-1]})" if state.history else ""
    typer.echo(f"version {version} is live for {model}{earlier}; pinned")


@app.command()
@user_errors
def rollback(model: ModelFolder) -> None:
    """Back to the version that was live before the last promote, pin or rollback."""
    from serving.core.releases import rollback as roll_back

    before, after = roll_back(model)
    typer.echo(f"version {after} is live again for {model} (was {before}); pinned")


@app.command()
@user_errors
def pin(
    model: ModelFolder,
    version: Annotated[Optional[int], typer.Argument(help="The version to hold.")] = None,
    latest: Annotated[
        bool,
        typer.Option("--latest", help="Follow the newest version again (it must verify)."),
    ] = False,
) -> None:
    """Hold a version live (stop following the newest), or --latest to follow it again. The
    version is checked first: one that does not verify is refused."""
    from serving.core.errors import ConfigError
    from serving.core.releases import current_live
    from serving.core.releases import pin as pin_version

    if latest == (version is not None):
        raise ConfigError("give a VERSION to pin, or --latest to follow the newest")
    pin_version(model, version)
    if latest:
        typer.echo(f"{model} follows its newest version (now {current_live(model)})")
    else:
        typer.echo(f"version {version} is pinned live for {model}")


def _parse_size(text: str) -> list[int]:
    from serving.core.errors import ConfigError

    parts = text.lower().replace(" ", "").split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"--image-size {text!r} must look like 64 or 64x48") from None
    if len(sizes) == 1:
        sizes *= 2
    if len(sizes) != 2:
        raise ConfigError(f"--image-size {text!r} must look like 64 or 64x48")
    return sizes


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
