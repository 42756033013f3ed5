"""``imgclf train``, ``export``, ``evaluate`` and ``register``: from images to a published,
registered model directory. TensorFlow is imported inside the commands that need it, after
their arguments are checked."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from imgclf.app import app, quiet_native_logs, user_errors

#: ``imgclf train``'s exit status when the run finished but the model did not learn.
DID_NOT_LEARN = 3


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
    cam = result.parity.get("explanation")
    if cam is not None:
        typer.echo(
            f"parity cam: maps max abs diff {cam['map_max_abs_diff']:.2e} against TensorFlow "
            f"on {cam['images']} images"
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
