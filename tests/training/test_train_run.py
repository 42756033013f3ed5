"""Whole training runs: the run directory, the metrics file, resume after a kill, CLI errors."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import time

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from serving.core.preprocessing import PreprocessSpec, preprocess_file
from tests.conftest import (
    IMGCLF,
    assert_one_line_error,
    assert_refused_before_tensorflow_loads,
    run_cli,
)
from tests.data import make_image_folder
from training import datasets
from training.config import load_config
from training.train import train

pytestmark = pytest.mark.slow  # every test here trains

FAST = {
    "data.image_size": [16, 16],
    "train.batch_size": 8,
    "train.epochs": 2,
    "model.weights": "none",
    "augmentation.horizontal_flip": False,
}


def history_rows(run_dir):
    with (run_dir / "history.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_run_directory_and_metrics_are_complete_and_true(tmp_path, image_folder):
    (image_folder / "2" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    config = load_config(overrides={**FAST, "data.data_dir": str(image_folder)})
    run_dir = tmp_path / "run"
    metrics = train(config, run_dir, verbose=0)

    for name in (
        "best.keras",
        "history.csv",
        "config.yaml",
        "manifest.csv",
        "metrics.json",
        "run.json",
        "plots/training_curves.png",
        "plots/confusion_matrix.png",
        "plots/roc_curves.png",
    ):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "backup").exists()
    assert len(history_rows(run_dir)) == 2
    assert load_config(run_dir / "config.yaml") == config

    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    test = on_disk["test"]
    for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "macro_auc"):
        assert 0.0 <= test[key] <= 1.0, key
    assert set(test["per_class"]) == {"0", "1", "2"}
    assert on_disk["classes"] == ["0", "1", "2"]
    assert sum(on_disk["split_sizes"].values()) == 36
    assert on_disk["skipped_count"] == 1
    assert on_disk["skipped_files"][0]["path"].endswith("broken.png")

    # The reported accuracy is what the saved checkpoint scores on the manifest's test images.
    import keras

    model = keras.saving.load_model(run_dir / "best.keras", safe_mode=True)
    test_samples = datasets.read_manifest(run_dir)["test"]
    spec = PreprocessSpec(16, 16)
    images = np.stack([preprocess_file(s.path, spec) for s in test_samples])
    predicted = model.predict(images, verbose=0).argmax(axis=1)
    truth = np.array([on_disk["classes"].index(s.label) for s in test_samples])
    assert test["accuracy"] == pytest.approx(float((predicted == truth).mean()))
    matrix = np.array(test["confusion_matrix"])
    assert matrix.sum() == len(test_samples) == test["count"]
    assert np.trace(matrix) / matrix.sum() == pytest.approx(test["accuracy"])


def test_finished_run_is_not_overwritten_without_force(tmp_path, image_folder):
    config = load_config(overrides={**FAST, "train.epochs": 1, "data.data_dir": str(image_folder)})
    run_dir = tmp_path / "run"
    train(config, run_dir, verbose=0)
    from serving.core.errors import ConfigError

    with pytest.raises(ConfigError, match="finished run"):
        train(config, run_dir, verbose=0)
    stamp = (run_dir / "metrics.json").stat().st_mtime_ns
    train(config, run_dir, force=True, verbose=0)
    assert (run_dir / "metrics.json").stat().st_mtime_ns != stamp


def test_other_optimizers_schedules_and_two_stage_fine_tuning(tmp_path, image_folder):
    config = load_config(
        overrides={
            **FAST,
            "data.data_dir": str(image_folder),
            "data.image_size": [32, 32],
            "model.arch": "mobilenetv2",
            "train.head_epochs": 1,
            "train.optimizer": "sgd",
            "train.schedule": "cosine",
            "train.label_smoothing": 0.1,
            "train.class_weight": "balanced",
            "model.fine_tune_layers": 10,
        }
    )
    run_dir = tmp_path / "run"
    train(config, run_dir, verbose=0)
    assert [int(r["epoch"]) for r in history_rows(run_dir)] == [0, 1]
    run_info = json.loads((run_dir / "run.json").read_text())
    assert run_info["epochs_run"] == 2 and run_info["arch"] == "mobilenetv2"
    assert not (run_dir / "head.weights.h5").exists()


def test_killed_run_resumes_where_it_stopped(tmp_path):
    data = make_image_folder(tmp_path / "images", 30)
    run_dir = tmp_path / "run"
    args = [
        "train",
        "--data",
        str(data),
        "--output",
        str(run_dir),
        "--image-size",
        "40",
        "--epochs",
        "10",
        "--batch-size",
        "8",
        "--weights",
        "none",
        "--set",
        "train.early_stopping_patience=100",
        "--set",
        "augmentation.horizontal_flip=false",
    ]
    process = subprocess.Popen([IMGCLF, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if (run_dir / "history.csv").exists() and len(history_rows(run_dir)) >= 3:
            break
        time.sleep(0.05)
    assert process.poll() is None, "training finished before it could be interrupted"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run_dir / "metrics.json").exists()
    done_before = len(history_rows(run_dir))

    # Finished epochs are worth keeping: another config is refused, the folder left as it was,
    # before TensorFlow loads (with --verbose at its default log level, an import would print
    # TensorFlow's native start-up lines).
    assert_refused_before_tensorflow_loads(
        [("11" if arg == "10" else arg) for arg in args],
        "interrupted run with a different config",
        "--force",
    )
    assert len(history_rows(run_dir)) == done_before

    resumed = run_cli(*args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    first_epoch = next(line for line in resumed.stdout.splitlines() if line.startswith("Epoch "))
    assert int(first_epoch.split()[1].split("/")[0]) >= done_before  # did not start from 1
    epochs = [int(r["epoch"]) for r in history_rows(run_dir)]
    assert epochs == list(range(10))
    assert json.loads((run_dir / "run.json").read_text())["resumed"] is True
    assert not (run_dir / "backup").exists()

    # Finished: the same command is refused without --force, before TensorFlow loads too.
    assert_refused_before_tensorflow_loads(args, "already holds a finished run", "--force")


def test_cli_user_mistakes_are_one_line(tmp_path, image_folder):
    missing = run_cli("train", "--data", str(tmp_path / "nowhere"), "--output", str(tmp_path / "a"))
    assert_one_line_error(missing, "does not exist")

    empty = tmp_path / "empty_class"
    make_image_folder(empty, 3, classes=(1, 2))
    (empty / "9").mkdir()
    assert_refused_before_tensorflow_loads(
        ["train", "--data", str(empty), "--output", str(tmp_path / "b")], "9", "no images"
    )
    # Neither failure left a run folder behind that would refuse the corrected command as
    # "an interrupted run with a different config".
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    fixed = run_cli(
        *("train", "--data", str(image_folder), "--output", str(tmp_path / "b")),
        *("--image-size", "16", "--epochs", "1", "--weights", "none"),
    )
    assert fixed.returncode in (0, 3), fixed.stderr[-2000:]  # trained (learning or not)
    assert (tmp_path / "b" / "metrics.json").exists()
    # Into a log (no terminal): one line per epoch, no progress bars, no Keras warning.
    assert "\x1b[" not in fixed.stdout + fixed.stderr and "shuffle=True" not in fixed.stderr
    assert "val_accuracy" in fixed.stdout  # the epoch's one line

    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text("train: [unclosed\n")
    assert_one_line_error(
        run_cli("train", "--config", str(bad_config), "--output", str(tmp_path / "c")), "YAML"
    )
    assert_one_line_error(
        run_cli("train", "--config", str(tmp_path / "none.yaml"), "--output", str(tmp_path / "d")),
        "does not exist",
    )
    assert_one_line_error(
        run_cli(
            "train", "--dataset", "digits", "--arch", "alexnet", "--output", str(tmp_path / "e")
        ),
        "unknown architecture 'alexnet'",
    )


def test_imagenet_offline_failure_is_one_line_and_its_fix_runs_there(tmp_path, image_folder):
    """The real keras.applications download path, with the network made unreachable; the
    ``--weights none`` the error suggests then runs in the same --output (no epoch ran)."""
    unreachable = "http://127.0.0.1:9"
    env = {
        "KERAS_HOME": str(tmp_path / "keras_home"),
        "https_proxy": unreachable,
        "HTTPS_PROXY": unreachable,
        "http_proxy": unreachable,
        "no_proxy": "",
        "NO_PROXY": "",
    }
    result = run_cli(
        "train",
        "--data",
        str(image_folder),
        "--output",
        str(tmp_path / "run"),
        "--arch",
        "mobilenetv2",
        "--weights",
        "imagenet",
        "--image-size",
        "32",
        "--epochs",
        "1",
        env=env,
    )
    assert_one_line_error(result, "cannot download ImageNet weights for mobilenetv2", "--weights")
    assert len(result.stderr.splitlines()) == 1, result.stderr  # no Keras warning before it
    assert "Downloading data from" not in result.stdout + result.stderr

    fixed = run_cli(*[("none" if arg == "imagenet" else arg) for arg in result.args[1:]], env=env)
    assert fixed.returncode in (0, 3), fixed.stderr[-2000:]  # trained (learning or not)
    assert "left nothing to resume" in fixed.stderr
    assert (tmp_path / "run" / "metrics.json").exists()
