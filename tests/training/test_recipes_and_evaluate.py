"""The recipe a run gets (presets, provenance), runs that do not learn, `imgclf evaluate` of a
published model, and exporting twice against one BentoML store (``make clean && make run``)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

pytest.importorskip("tensorflow")

from tests.conftest import (
    TF_NATIVE_LINES,
    assert_one_line_error,
    assert_refused_before_tensorflow_loads,
    cli_ok,
    run_cli,
)
from tests.serving.variants import publish_variant
from training.config import Config, annotated_yaml, resolve_config


def test_a_built_in_data_set_brings_its_recipe_and_every_value_says_where_from():
    config, sources = resolve_config(
        None,
        {"data.dataset": "digits", "train.epochs": 3, "train.batch_size": 64},
        flags={"data.dataset", "train.epochs"},
        preset="digits",
    )
    assert config.data.image_size == (32, 32)  # the digits recipe, not the 64x64 default
    assert (config.train.epochs, config.train.batch_size) == (3, 64)  # flags and --set win
    assert sources["data.image_size"] == "preset digits"
    assert sources["train.epochs"] == "flag"
    assert sources["train.batch_size"] == "--set"
    assert sources["data.channels"] == "default"
    text = annotated_yaml(config, sources)
    assert "epochs: 3  # flag" in text and "  - 32" in text
    assert Config.model_validate(yaml.safe_load(text)) == config  # comments change nothing
    plain, plain_sources = resolve_config(None, {"data.dataset": "digits"})
    assert plain.data.image_size == (64, 64) and plain_sources["data.image_size"] == "default"


def noise_folder(root, classes: int = 3, per_class: int = 60):
    """One image of noise under every class name: nothing to learn, and whatever the model
    answers, it answers for every validation image alike, so it can never beat the largest
    class. (Different noise images per file let a lucky epoch reach 14 of 27 validation
    images, past the two-standard-error margin, in about one run in ten.)"""
    pixels = np.random.default_rng(7).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    for label in range(classes):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    return root


@pytest.mark.slow
def test_a_run_that_does_not_learn_says_so_and_exits_3(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        *("train", "--data", str(noise_folder(tmp_path / "noise")), "--output", str(run_dir)),
        *("--image-size", "16", "--epochs", "4", "--batch-size", "16"),
        timeout=300,
    )
    assert result.returncode == 3, result.stderr[-2000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "did not learn" in warnings[0], result.stderr[-2000:]
    learning = json.loads((run_dir / "metrics.json").read_text())["learning"]
    assert learning["learned"] is False
    assert learning["baseline_accuracy"] == pytest.approx(1 / 3, abs=0.02)
    # Not published by `imgclf export` without a word: refused in one line, unless asked.
    repository = tmp_path / "repository"
    export = ("export", str(run_dir), "--repository", str(repository), "--no-register")
    refused = run_cli(*export)
    assert_one_line_error(refused, "did not learn", "--allow-unlearned")
    assert refused.returncode == 1
    assert not (repository / "run" / "1").exists()
    published = run_cli(*export, "--allow-unlearned")
    assert published.returncode == 0, published.stderr[-2000:]
    assert "published" in published.stdout
    assert (repository / "run" / "1" / "model.onnx").is_file()


#: TensorFlow's, absl's and the converters' start-up chatter, none of it ours.
NATIVE_NOISE = (*TF_NATIVE_LINES, "INFO tf2onnx", "INFO tensorflow")


def test_export_hides_tensorflows_native_start_up_lines(published_export):
    """The fixture's export ran with TensorFlow's log level at its default; `--verbose` shows
    the lines (tests/training/test_export.py, on a failing export)."""
    _, stderr = published_export
    for noise in NATIVE_NOISE:
        assert noise not in stderr, stderr[-2000:]


def test_evaluate_on_the_runs_own_test_split_equals_its_metrics(
    published_model, trained_run, tmp_path
):
    output = tmp_path / "evaluation"
    cli_ok(
        *("evaluate", str(published_model), "--run", str(trained_run), "--split", "test"),
        *("--output", str(output)),
    )
    evaluation = json.loads((output / "evaluation.json").read_text())
    expected = json.loads((trained_run / "metrics.json").read_text())["test"]
    assert evaluation["count"] == expected["count"]
    assert evaluation["confusion_matrix"] == expected["confusion_matrix"]
    for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1"):
        assert evaluation[key] == pytest.approx(expected[key], abs=1e-12), key
    assert evaluation["macro_auc"] == pytest.approx(expected["macro_auc"], abs=1e-6)
    assert evaluation["per_class"] == expected["per_class"]
    assert 0 <= evaluation["calibration"]["ece"] <= 1
    for plot in ("confusion_matrix.png", "roc_curves.png", "reliability.png"):
        assert (output / plot).stat().st_size > 1000, plot


def test_evaluate_refuses_unknown_classes_and_skips_corrupt_files(
    published_model, small_dataset, tmp_path
):
    folder = tmp_path / "labelled"
    shutil.copytree(small_dataset, folder)
    (folder / "1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    result = run_cli(
        *("evaluate", str(published_model), "--data", str(folder)),
        *("--output", str(tmp_path / "out")),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    evaluation = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert evaluation["unreadable_count"] == 1
    assert evaluation["count"] == sum(1 for p in small_dataset.rglob("*") if p.is_file())
    (folder / "cats").mkdir()
    shutil.copy(next((folder / "1").glob("*.png")), folder / "cats" / "a.png")
    assert_one_line_error(
        run_cli(
            *("evaluate", str(published_model), "--data", str(folder)),
            *("--output", str(tmp_path / "out2")),
        ),
        "cats",
        "not classes of tiny v1",
    )


def test_make_clean_then_export_again_against_the_same_store(
    trained_run, published_model, tmp_path
):
    """`make clean` removes model_repository/ but not BentoML's store: the export after it
    must pick a version new in both. What the first export leaves, version 1 in both, is
    the cached export of the same run published as ``again`` and registered by the real
    ``imgclf register`` (one export per behaviour: this one's is the second)."""
    repository = tmp_path / "model_repository"
    first = publish_variant(published_model, 1, into=repository / "again", name="again")
    registered = run_cli("register", str(first))
    assert registered.returncode == 0 and "again:1" in registered.stdout, registered.stderr
    shutil.rmtree(repository)  # make clean
    arguments = ("export", str(trained_run), "--repository", str(repository), "--name", "again")
    second = run_cli(*arguments)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "registered BentoML model again:2" in second.stdout
    assert sorted(p.name for p in (repository / "again").iterdir()) == ["2"]
    assert_refused_before_tensorflow_loads(
        [*arguments, "--version", "1"], "already in BentoML's model store"
    )
    assert not (repository / "again" / "1").exists()
