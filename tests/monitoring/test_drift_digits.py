"""Drift on real images, in process: held-out digits stay below every calibrated warning
threshold; darkened, rotated and three-digit windows cross the critical threshold on the
signal each one moves. (The same on a real server: test_live_monitoring.py.)"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from monitoring.drift import build_reference_profile, compare, image_signals
from serving.core.runtime import ClassifierRuntime
from tests.conftest import assert_one_line_error, run_cli
from training.datasets import read_manifest

WINDOW = 500


@pytest.fixture(scope="module")
def runtime(digits_model):
    return ClassifierRuntime(digits_model, provider="cpu")


@pytest.fixture(scope="module")
def halves(digits_run):
    """The run's held-out images, shuffled and split: one half builds the reference, the
    other half provides the windows (no image is in both)."""
    splits = read_manifest(digits_run)
    held_out = splits["validation"] + splits["test"]
    order = np.random.default_rng(7).permutation(len(held_out))
    shuffled = [held_out[i] for i in order]
    middle = len(shuffled) // 2
    return shuffled[:middle], shuffled[middle:]


def signals_of(runtime, images: list[Image.Image]) -> dict:
    arrays = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        arrays.append(runtime.preprocess(buffer.getvalue()))
    batch = np.stack(arrays)
    return image_signals(batch, runtime.predict(batch))


def load(samples) -> list[Image.Image]:
    images = []
    for sample in samples:
        with Image.open(sample.path) as image:
            images.append(image.convert("L").copy())
    return images


@pytest.fixture(scope="module")
def reference(runtime, halves):
    reference_half, _ = halves
    return build_reference_profile(
        signals_of(runtime, load(reference_half)), runtime.classes, source="held-out half A"
    )


def window(samples, rng, size=WINDOW, replace=False):
    picked = rng.choice(len(samples), size=size, replace=replace)
    return [samples[i] for i in picked]


def test_held_out_windows_raise_no_drift(runtime, halves, reference):
    _, window_half = halves
    assert len(window_half) >= WINDOW
    rng = np.random.default_rng(0)
    statuses = []
    for _ in range(3):
        report = compare(reference, signals_of(runtime, load(window(window_half, rng))))
        for name, values in report["signals"].items():
            for statistic, bounds in values["thresholds"].items():
                assert values[statistic] <= bounds["critical"], (name, statistic, values)
        statuses.append(report["status"])
    # Calibrated so that at most 1 % of in-distribution windows warn: two of three would be
    # a one-in-3,000 chance (the one-window, no-warning check runs on a real server in
    # test_live_monitoring.py).
    assert statuses.count("stable") >= 2, statuses


def test_darkened_images_move_brightness(runtime, halves, reference):
    images = [
        ImageEnhance.Brightness(image).enhance(0.4)
        for image in load(window(halves[1], np.random.default_rng(1)))
    ]
    report = compare(reference, signals_of(runtime, images))
    assert report["signals"]["brightness"]["level"] == "critical"
    assert report["signals"]["brightness"]["psi"] > 0.25
    assert (
        report["signals"]["brightness"]["mean"] < report["signals"]["brightness"]["reference_mean"]
    )
    assert report["status"] == "critical"


def test_rotated_images_move_the_predictions(runtime, halves, reference):
    images = [image.rotate(90) for image in load(window(halves[1], np.random.default_rng(2)))]
    report = compare(reference, signals_of(runtime, images))
    moved = {name: report["signals"][name]["level"] for name in ("class", "confidence", "entropy")}
    assert "critical" in moved.values(), moved
    # Rotation changes what the model sees, not the pixel statistics.
    assert report["signals"]["brightness"]["level"] == "stable"


def test_three_digit_class_mix_moves_the_class_signal(runtime, halves, reference):
    three = [s for s in halves[1] if s.label in ("1", "4", "7")]
    images = load(window(three, np.random.default_rng(3), replace=True))
    report = compare(reference, signals_of(runtime, images))
    assert report["signals"]["class"]["level"] == "critical"
    assert report["signals"]["class"]["js_distance"] > 0.3
    mix = report["signals"]["class"]["distribution"]
    assert sum(mix[label] for label in ("1", "4", "7")) > 0.8


def test_export_writes_the_profile_from_the_validation_split_only(digits_model, digits_run):
    """The test split stays out of the profile, the calibration and the embedding reference:
    it is what checks them."""
    profile = json.loads((digits_model / "reference_profile.json").read_text())
    sizes = json.loads((digits_run / "metrics.json").read_text())["split_sizes"]
    assert profile["samples"] == sizes["validation"]
    assert f"{sizes['validation']} validation images" in profile["source"]
    calibration = json.loads((digits_model / "calibration.json").read_text())
    assert calibration["samples"] == sizes["validation"]
    assert 0.05 < calibration["temperature"] < 20
    assert (
        calibration["after"]["negative_log_likelihood"]
        <= calibration["before"]["negative_log_likelihood"]
    )
    embedding = profile["embedding"]
    assert embedding["samples"] == sizes["validation"] and embedding["file"] == (
        "embedding_reference.npz"
    )
    assert 0.5 - 0.05 < embedding["thresholds"]["null_mean"] < 0.5 + 0.05
    metadata = json.loads((digits_model / "metadata.json").read_text())
    assert {"calibration.json", "embedding_reference.npz"} <= set(metadata["files"])
    assert profile["classes"] == [str(d) for d in range(10)]
    assert sum(profile["class_distribution"]) == pytest.approx(1.0)
    for name in ("confidence", "entropy", "brightness", "contrast"):
        assert sum(profile["signals"][name]["bin_fractions"]) == pytest.approx(1.0)
        assert min(profile["signals"][name]["bin_fractions"]) > 0
    calibrated = profile["thresholds"]
    sizes = len(calibrated["window_sizes"])
    for statistics in calibrated["values"].values():
        for levels in statistics.values():
            assert len(levels["warning"]) == len(levels["critical"]) == sizes
            assert all(c >= w for w, c in zip(levels["warning"], levels["critical"], strict=True))
    performance = profile["performance"]
    assert performance["samples"] == profile["samples"]
    assert 0.8 < performance["accuracy"] <= 1.0
    assert performance["expected_calibration_error"] < 0.1
    metadata = json.loads((digits_model / "metadata.json").read_text())
    assert "reference_profile.json" in metadata["files"]


def test_drift_command_sees_a_reframing_in_the_embeddings_only(tmp_path, digits_model, digits_run):
    """Test-split digits one pixel to the right (every pixel kept): the outputs and pixel
    statistics stay below critical, the embeddings do not."""
    folder = tmp_path / "reframed"
    folder.mkdir()
    for index, image in enumerate(load(read_manifest(digits_run)["test"][:300])):
        Image.fromarray(np.roll(np.asarray(image), 1, axis=1), "L").save(folder / f"{index}.png")
    output = tmp_path / "report.json"
    result = run_cli("drift", str(folder), "--model", str(digits_model), "--output", str(output))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(output.read_text())
    assert report["embedding"]["level"] == "critical", report["embedding"]
    assert report["embedding"]["sampled_from"] == 300
    assert report["signals"]["brightness"]["level"] == "stable"
    assert "embedding" in result.stdout and "AUC" in result.stdout


def test_drift_command_reports_and_can_fail_a_job(tmp_path, digits_model, halves):
    folder = tmp_path / "dark"
    folder.mkdir()
    for index, image in enumerate(load(halves[1][:120])):
        ImageEnhance.Brightness(image).enhance(0.3).save(folder / f"{index}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    output = tmp_path / "report.json"
    result = run_cli("drift", str(folder), "--model", str(digits_model), "--output", str(output))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(output.read_text())
    assert report["samples"] == 120 and report["images"] == 121
    assert [f["path"] for f in report["failed"]] == [str(folder / "broken.png")]
    assert report["signals"]["brightness"]["psi"] > 0.25 and report["status"] == "critical"
    assert "brightness" in result.stdout
    assert report["embedding"]["level"] == "critical" and "embedding" in result.stdout
    failing = run_cli(
        "drift",
        str(folder),
        "--model",
        str(digits_model),
        "--output",
        str(output),
        "--fail-on",
        "critical",
    )
    assert failing.returncode == 3
    assert_one_line_error(
        run_cli(
            "drift",
            str(tmp_path / "nothing*.png"),
            "--model",
            str(digits_model),
            "--output",
            str(output),
        ),
        "holds no images",
    )
    assert_one_line_error(
        run_cli(
            "drift",
            str(tmp_path / "missing"),
            "--model",
            str(digits_model),
            "--output",
            str(output),
        ),
        "not a folder",
    )
