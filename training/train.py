"""``imgclf train``: image folder -> best checkpoint, history, metrics and plots in a run directory.

Reads top to bottom: prepare the run directory, load and split the data, build the input
pipeline, build the model, fit (one stage, or head then fine-tune for backbones), evaluate the
best checkpoint on the held-out test split.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from serving.core.files import atomic_write, write_json
from training import datasets, evaluate, plots
from training.augmentation import build_augmentation
from training.callbacks import AtomicModelCheckpoint, read_best_state
from training.config import Config
from training.models import build_model, unfreeze_top
from training.pipeline import make_dataset, preprocess_spec
from training.run_dir import RunPaths, prepare_run_dir

log = logging.getLogger(__name__)


def train(
    config: Config,
    output_dir: Path,
    *,
    force: bool = False,
    verbose: str | int = "auto",
    sources: dict[str, str] | None = None,
) -> dict:
    """Train, keep the best checkpoint and evaluate it; returns the contents of ``metrics.json``.

    ``sources`` (where each config value came from) is written into the run's config.yaml."""
    started = time.time()
    run = RunPaths(Path(output_dir))
    resuming = prepare_run_dir(run, config, force=force, sources=sources)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()

    try:
        spec = preprocess_spec(config.data)
        splits, classes, skipped = _load_splits(config, run, spec, resuming=resuming)
    except BaseException:
        if not resuming:  # nothing started: leave nothing that would block the fixed command
            shutil.rmtree(run.root, ignore_errors=True)
        raise
    loaders = {
        name: make_dataset(
            splits[name],
            classes,
            spec,
            batch_size=config.train.batch_size,
            training=name == "train",
            augmentation=build_augmentation(config.augmentation, seed=config.seed)
            if name == "train"
            else None,
            cache=config.data.cache,
            cache_limit_bytes=config.data.cache_limit_bytes,
            seed=config.seed,
        )
        for name in datasets.SPLITS
    }

    model, backbone = build_model(
        config.model.arch,
        spec.input_shape,
        len(classes),
        weights=config.model.weights,
        dropout=config.model.dropout,
        l2=config.model.l2,
    )
    class_weight = (
        _class_weights(splits["train"], classes)
        if config.train.class_weight == "balanced"
        else None
    )
    epochs_run = _fit(model, backbone, config, loaders, run, class_weight, verbose)

    metrics = _evaluate_best(run, loaders["test"], splits, classes, skipped)
    _dedupe_history(run.history)
    plots.plot_training_curves(run.history, run.plots / "training_curves.png")
    write_json(
        run.run,
        {
            "arch": config.model.arch,
            "classes": classes,
            "input_shape": list(spec.input_shape),
            "preprocessing": spec.describe(),
            "data_root": str(_data_root(config)),
            "epochs_run": epochs_run,
            "best": read_best_state(run.root),
            "resumed": resuming,
            "seconds": round(time.time() - started, 1),
            "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        },
    )
    for leftover in (run.state, run.head_weights):
        leftover.unlink(missing_ok=True)
    shutil.rmtree(run.backup, ignore_errors=True)
    return metrics


def _data_root(config: Config) -> Path:
    if config.data.dataset == "digits":
        return datasets.write_digits(config.data.data_home)
    return Path(config.data.data_dir).resolve()


def _load_splits(config: Config, run: RunPaths, spec, *, resuming: bool):
    folder = datasets.discover(_data_root(config))
    if resuming and (run.root / datasets.MANIFEST_NAME).exists():
        splits = datasets.read_manifest(run.root)
        skipped = json.loads(run.state.read_text()).get("skipped", []) if run.state.exists() else []
        return splits, folder.classes, skipped
    good, skipped = datasets.check_readable(folder.samples, spec)
    if skipped:
        log.warning("skipped %d unreadable file(s); see metrics.json", len(skipped))
    splits = datasets.split_samples(
        good,
        folder.classes,
        validation_fraction=config.data.validation_fraction,
        test_fraction=config.data.test_fraction,
        seed=config.seed,
    )
    datasets.write_manifest(run.root, splits)
    _update_state(run, skipped=skipped)
    return splits, folder.classes, skipped


def _fit(model, backbone, config: Config, loaders, run: RunPaths, class_weight, verbose) -> int:
    """One stage for the seed CNN; head then fine-tune for backbones. Returns epochs run."""
    train_cfg = config.train
    steps = int(tf.data.experimental.cardinality(loaders["train"]).numpy())
    if backbone is None:
        _compile(model, config, train_cfg.learning_rate, steps * train_cfg.epochs)
        history = _fit_stage(
            model, config, loaders, run, "train", 0, train_cfg.epochs, class_weight, verbose
        )
        return len(history)

    state = _read_state(run)
    head_epochs = min(train_cfg.head_epochs, train_cfg.epochs)
    if not state.get("head_done"):
        _compile(model, config, train_cfg.learning_rate, steps * head_epochs)
        done = len(
            _fit_stage(model, config, loaders, run, "head", 0, head_epochs, class_weight, verbose)
        )
        model.save_weights(run.head_weights)
        _update_state(run, head_done=True, head_epochs_run=done)
    else:
        model.load_weights(run.head_weights)
        done = state["head_epochs_run"]
    if train_cfg.epochs <= done:
        return done
    unfrozen = unfreeze_top(backbone, config.model.fine_tune_layers, l2=config.model.l2)
    log.info("fine-tuning the top %d weighted backbone layers", unfrozen)
    _compile(model, config, train_cfg.fine_tune_learning_rate, steps * (train_cfg.epochs - done))
    history = _fit_stage(
        model, config, loaders, run, "fine_tune", done, train_cfg.epochs, class_weight, verbose
    )
    return done + len(history)


def _compile(model: keras.Model, config: Config, learning_rate: float, total_steps: int) -> None:
    train_cfg = config.train
    rate = learning_rate
    if train_cfg.schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(
            learning_rate, decay_steps=max(total_steps, 1)
        )
    if train_cfg.optimizer == "adam":
        optimizer = keras.optimizers.Adam(rate)
    else:
        optimizer = keras.optimizers.SGD(rate, momentum=train_cfg.momentum)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=train_cfg.label_smoothing),
        metrics=["accuracy"],
    )


def _fit_stage(model, config, loaders, run, stage, initial_epoch, epochs, class_weight, verbose):
    train_cfg = config.train
    callbacks = [
        keras.callbacks.BackupAndRestore(str(run.backup / stage), double_checkpoint=True),
        AtomicModelCheckpoint(run.best, monitor="val_accuracy"),
        keras.callbacks.EarlyStopping(
            monitor="val_loss",
            patience=train_cfg.early_stopping_patience,
            restore_best_weights=True,
            start_from_epoch=train_cfg.min_epochs,
        ),
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.CSVLogger(str(run.history), append=True),
    ]
    if train_cfg.schedule == "plateau":
        callbacks.insert(
            3,
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss",
                factor=train_cfg.plateau_factor,
                patience=train_cfg.plateau_patience,
                min_lr=train_cfg.min_learning_rate,
            ),
        )
    history = model.fit(
        loaders["train"],
        validation_data=loaders["validation"],
        initial_epoch=initial_epoch,
        epochs=epochs,
        callbacks=callbacks,
        class_weight=class_weight,
        verbose=verbose,
        shuffle=False,  # the tf.data pipeline shuffles; Keras would only warn it ignores this
    )
    return history.epoch


def _evaluate_best(run: RunPaths, test_loader, splits, classes, skipped) -> dict:
    best = keras.saving.load_model(run.best, safe_mode=True)
    probabilities = best.predict(test_loader, verbose=0)
    index = {name: i for i, name in enumerate(classes)}
    true_labels = np.array([index[s.label] for s in splits["test"]])
    report = evaluate.classification_report(true_labels, probabilities, classes)
    best_state = read_best_state(run.root)
    metrics = {
        "test": report,
        "classes": classes,
        "split_sizes": {name: len(items) for name, items in splits.items()},
        "best_epoch": best_state.get("epoch"),
        "learning": learning_check(best_state.get("val_accuracy"), splits["validation"], classes),
        "skipped_files": skipped,
        "skipped_count": len(skipped),
    }
    plots.plot_confusion_matrix(
        report["confusion_matrix"], classes, run.plots / "confusion_matrix.png"
    )
    plots.plot_roc_curves(true_labels, probabilities, classes, run.plots / "roc_curves.png")
    write_json(run.metrics, metrics)
    return metrics


def learning_check(best_validation_accuracy: float | None, validation, classes) -> dict:
    """Did the run learn? Its best validation accuracy must beat both chance and always
    answering the largest class by more than two standard errors of that baseline."""
    counts = [sum(1 for s in validation if s.label == name) for name in classes]
    total = max(sum(counts), 1)
    baseline = max(1.0 / len(classes), max(counts) / total)
    margin = 2.0 * math.sqrt(baseline * (1.0 - baseline) / total)
    best = float(best_validation_accuracy or 0.0)
    learned = best > baseline + margin
    check = {
        "learned": learned,
        "best_validation_accuracy": best,
        "baseline_accuracy": baseline,
        "margin": margin,
    }
    if not learned:
        check["warning"] = (
            f"the model did not learn: best validation accuracy {best:.3f} is no better than "
            f"chance or the largest class ({baseline:.3f}, +/- {margin:.3f}); check the labels, "
            "the learning rate and the augmentation"
        )
    return check


def _class_weights(samples, classes) -> dict[int, float]:
    counts = np.array([sum(1 for s in samples if s.label == name) for name in classes], dtype=float)
    return {i: float(len(samples) / (len(classes) * count)) for i, count in enumerate(counts)}


def _dedupe_history(path: Path) -> None:
    """A kill between the CSV write and the backup can repeat an epoch; keep its last row."""
    if not path.exists():
        return
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return
    by_epoch = {int(row["epoch"]): row for row in rows}
    fields = list(rows[-1].keys())
    with atomic_write(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(by_epoch[epoch] for epoch in sorted(by_epoch))


def _read_state(run: RunPaths) -> dict:
    return json.loads(run.state.read_text()) if run.state.exists() else {}


def _update_state(run: RunPaths, **values) -> None:
    write_json(run.state, {**_read_state(run), **values})
