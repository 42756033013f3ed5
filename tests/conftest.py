"""Fixtures shared by every test: real image files built from scikit-learn's handwritten digits."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# A private BentoML store for the whole session, set before anything imports bentoml.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="imgclf-bentoml-")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

REPO = Path(__file__).resolve().parents[1]
IMGCLF = str(Path(sys.executable).with_name("imgclf"))
SAVE_FORMATS = [  # (suffix, Pillow format, mode): the formats a class folder may mix
    (".png", "PNG", "L"),
    (".jpg", "JPEG", "RGB"),
    (".png", "PNG", "RGBA"),
    (".bmp", "BMP", "RGB"),
    (".gif", "GIF", "P"),
    (".webp", "WEBP", "RGB"),
]


#: TensorFlow's native start-up lines, printed when it is imported at its default log level
#: (the oneDNN one only on CPUs where it turns oneDNN on) unless imgclf hides them.
TF_NATIVE_LINES = ("absl::InitializeLog", "oneDNN custom operations")

#: Fixtures that train, export or start a service: every test using one is marked slow, so
#: that ``pytest -m "not slow"`` (make test-fast) is the quick subset for day-to-day work.
SLOW_FIXTURES = frozenset(
    {
        "trained_run",
        "published_export",
        "published_model",
        "digits_run",
        "digits_model",
        "service_module",
        "client",
        "server",
        "http",
        "api",
    }
)


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def digit_images(count_per_class: int, classes: tuple[int, ...] = (0, 1, 2), scale: int = 4):
    """Real 8x8 digit scans, upscaled so JPEG and resize have something to work on."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in classes:
        picked = np.flatnonzero(digits.target == label)[:count_per_class]
        for index in picked:
            pixels = np.rint(digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
            image = Image.fromarray(pixels, mode="L").resize((8 * scale, 8 * scale), Image.NEAREST)
            yield str(label), int(index), image


def write_image(image: Image.Image, path: Path, fmt: str, mode: str) -> Path:
    converted = image.convert(mode)
    if mode == "RGBA":  # a real alpha channel: transparent background, opaque ink
        alpha = Image.eval(image.convert("L"), lambda v: 255 if v > 40 else 60)
        converted.putalpha(alpha)
    converted.save(path, format=fmt)
    return path


def make_image_folder(root: Path, count_per_class: int = 12, classes=(0, 1, 2)) -> Path:
    """``root/<digit>/<file>`` with every supported format and colour mode mixed in."""
    for position, (label, index, image) in enumerate(digit_images(count_per_class, classes)):
        suffix, fmt, mode = SAVE_FORMATS[position % len(SAVE_FORMATS)]
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        write_image(image, folder / f"digit_{index:04d}_{mode.lower()}{suffix}", fmt, mode)
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture(scope="session")
def digits_home(tmp_path_factory) -> Path:
    """The built-in digits written once per session into a private data home."""
    home = tmp_path_factory.mktemp("data_home")
    from training.datasets import write_digits

    write_digits(home)
    return home


def run_cli(*args: str, env: dict | None = None, timeout: int = 300, cwd: Path | None = None):
    """Run the installed ``imgclf`` command in a fresh process, as a user would."""
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    return subprocess.run(
        [IMGCLF, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=cwd or REPO,
    )


def assert_one_line_error(result, *fragments: str) -> None:
    """A user mistake: non-zero exit, one ``error:`` line naming the problem, no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """Five digit classes, 40 real scans each, in every supported format."""
    return make_image_folder(tmp_path_factory.mktemp("small") / "images", 40, (0, 1, 2, 3, 4))


def cli_ok(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run an imgclf command that a fixture depends on; fail with its stderr if it fails."""
    result = run_cli(*args, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def overrides(**values) -> list[str]:
    """``--set`` flags from keyword arguments: overrides(train__epochs=3)."""
    flags = []
    for key, value in values.items():
        flags += ["--set", f"{key.replace('__', '.')}={value}"]
    return flags


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, small_dataset) -> Path:
    """A small seed CNN trained by the real CLI (16x16, a few epochs)."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    cli_ok(
        "train",
        "--data",
        str(small_dataset),
        "--output",
        str(run_dir),
        "--image-size",
        "16",
        "--epochs",
        "6",
        "--batch-size",
        "16",
        "--weights",
        "none",
        *overrides(augmentation__horizontal_flip="false", model__dropout=0.2),
    )
    return run_dir


@pytest.fixture(scope="session")
def published_export(tmp_path_factory, trained_run) -> tuple[Path, str]:
    """``trained_run`` exported by the real CLI (fp32 + int8) into a model repository, with
    TensorFlow's native log level at its default, as in a user's shell; and what the export
    wrote to stderr."""
    repository = tmp_path_factory.mktemp("repository")
    result = cli_ok(
        *("export", str(trained_run), "--repository", str(repository)),
        *("--name", "tiny", "--int8", "--no-register"),
        env={"TF_CPP_MIN_LOG_LEVEL": "0"},
    )
    return repository / "tiny" / "1", result.stderr


@pytest.fixture(scope="session")
def published_model(published_export) -> Path:
    return published_export[0]


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory, digits_home) -> Path:
    """The seed CNN on all 1,797 built-in digits at 16x16, with 60% of them held out (so drift
    tests can split the held-out images into a reference half and windows). Deterministic:
    the monitoring tests judge a model's behaviour under shifts, and every run (here and in
    CI) must judge the same model."""
    run_dir = tmp_path_factory.mktemp("runs") / "digits"
    cli_ok(
        "train",
        "--dataset",
        "digits",
        "--output",
        str(run_dir),
        "--image-size",
        "16",
        "--epochs",
        "14",
        "--batch-size",
        "16",
        "--weights",
        "none",
        *overrides(
            data__validation_fraction=0.3,
            data__test_fraction=0.3,
            augmentation__horizontal_flip="false",
            augmentation__rotation_degrees=10,
            augmentation__width_shift=0.1,
            augmentation__height_shift=0.1,
            augmentation__zoom=0.1,
            augmentation__fill_mode="constant",
            deterministic="true",
        ),
        env={"IMGCLF_DATA_HOME": str(digits_home)},
    )
    return run_dir


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory, digits_run) -> Path:
    repository = tmp_path_factory.mktemp("digits_repository")
    cli_ok(
        "export",
        str(digits_run),
        "--repository",
        str(repository),
        "--name",
        "digits",
        "--no-register",
    )
    return repository / "digits" / "1"
