"""Fixtures shared by every test: real image files built from scikit-learn's handwritten digits."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# A private BentoML store for the whole session, set before anything imports bentoml.
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="imgclf-bentoml-")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")

from tests.data import make_image_folder
from tests.file_order import RECORD, DurationRecorder, longest_first
from tests.model_cache import cached

REPO = Path(__file__).resolve().parents[1]
IMGCLF = str(Path(sys.executable).with_name("imgclf"))


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
    longest_first(items)


def pytest_configure(config) -> None:
    if os.environ.get(RECORD):
        config.pluginmanager.register(DurationRecorder(), "imgclf-durations")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "images")


@pytest.fixture(scope="session")
def digits_home() -> Path:
    """The built-in digits as PNG files in a data home of their own (cached)."""
    from training.datasets import write_digits

    return cached("digits-home", {}, write_digits)


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


def assert_refused_before_tensorflow_loads(args: list[str], *fragments: str) -> None:
    """``imgclf --verbose *args`` at TensorFlow's default native log level, where importing
    TensorFlow prints its start-up lines: one ``error:`` line naming ``fragments``, and none
    of those lines (the mistake was found before TensorFlow loaded)."""
    result = run_cli("--verbose", *args, env={"TF_CPP_MIN_LOG_LEVEL": "0"})
    assert_one_line_error(result, *fragments)
    assert not any(line in result.stderr for line in TF_NATIVE_LINES), result.stderr


def assert_refused_before_the_model_loads(result, *fragments: str) -> None:
    """A mistake in the arguments found before an ONNX Runtime session was made: one
    ``error:`` line, and no line of ONNX Runtime's (native) or ours about its session."""
    assert_one_line_error(result, *fragments)
    runtime_lines = [
        line
        for line in result.stderr.splitlines()
        if not line.startswith("error:")
        and ("onnxruntime" in line.lower() or "onnx runtime" in line.lower())
    ]
    assert not runtime_lines, result.stderr


@pytest.fixture(scope="session")
def small_dataset() -> Path:
    """Five digit classes, 40 real scans each, in every supported format (cached)."""
    recipe = {"count_per_class": 40, "classes": [0, 1, 2, 3, 4]}
    folder = cached(
        "small-dataset",
        recipe,
        lambda into: make_image_folder(into / "images", 40, tuple(recipe["classes"])),
    )
    return folder / "images"


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


def cached_cli(kind: str, args: list[str], env: dict | None = None, **options) -> Path:
    """The folder in which ``imgclf *args`` wrote (``{output}`` in ``args``: where it
    writes), its standard error kept as ``stderr.txt``; built by the real CLI unless the
    model cache holds it (``tests/model_cache.py``)."""

    def build(folder: Path) -> None:
        result = cli_ok(*(arg.format(output=folder) for arg in args), env=env)
        (folder / "stderr.txt").write_text(result.stderr)

    return cached(kind, {"args": args, "env": env}, build, **options)


def intact(model_dir: Path) -> bool:
    """The model directory still matches its own hashes (no test changed the cached copy)."""
    from serving.core.errors import ModelError
    from serving.core.model_dir import load_metadata, verify_files

    try:
        verify_files(model_dir, load_metadata(model_dir))
    except ModelError:
        return False
    return True


@pytest.fixture(scope="session")
def trained_run(small_dataset) -> Path:
    """A small seed CNN trained by the real CLI (16x16, a few epochs)."""
    args = [
        *("train", "--data", str(small_dataset), "--output", "{output}/run"),
        *("--image-size", "16", "--epochs", "6", "--batch-size", "16", "--weights", "none"),
        *overrides(augmentation__horizontal_flip="false", model__dropout=0.2),
    ]
    return cached_cli("tiny-run", args) / "run"


@pytest.fixture(scope="session")
def published_export(trained_run) -> tuple[Path, str]:
    """``trained_run`` exported by the real CLI (fp32 + int8) into a model repository, with
    TensorFlow's native log level at its default, as in a user's shell; and what the export
    wrote to stderr."""
    args = [
        *("export", str(trained_run), "--repository", "{output}/repository"),
        *("--name", "tiny", "--int8", "--no-register"),
    ]
    folder = cached_cli(
        "tiny-export",
        args,
        env={"TF_CPP_MIN_LOG_LEVEL": "0"},
        valid=lambda folder: intact(folder / "repository" / "tiny" / "1"),
    )
    return folder / "repository" / "tiny" / "1", (folder / "stderr.txt").read_text()


@pytest.fixture(scope="session")
def published_model(published_export) -> Path:
    return published_export[0]


def train_digits(digits_home: Path, image_size: int, epochs: int = 14) -> Path:
    """The seed CNN on all 1,797 built-in digits at ``image_size``, with 60% of them held out
    (cached). Deterministic: the monitoring tests judge a model's behaviour under shifts, and
    every run (here and in CI) must judge the same model."""
    args = [
        *("train", "--dataset", "digits", "--output", "{output}/run"),
        *("--image-size", str(image_size), "--epochs", str(epochs), "--batch-size", "16"),
        *("--weights", "none"),
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
    ]
    kind = "digits-run" if image_size == 16 else f"digits-run-{image_size}"
    return cached_cli(kind, args, env={"IMGCLF_DATA_HOME": str(digits_home)}) / "run"


@pytest.fixture(scope="session")
def digits_run(digits_home) -> Path:
    """The digits at 16x16 (so drift tests can split the held-out images into a reference
    half and windows)."""
    return train_digits(digits_home, 16)


@pytest.fixture(scope="session")
def digits_model_32(digits_home) -> Path:
    """The digits at 32x32, the size ``make run`` trains, exported (cached): its feature map
    is 8x8, fine enough to compare with a 7x7 occlusion grid (16x16 gives 4x4). Eight
    epochs (98.7 % held-out accuracy): 15 s less of the suite's time than 14."""
    return exported_digits(train_digits(digits_home, 32, epochs=8))


def exported_digits(digits_run: Path, *flags: str) -> Path:
    """``digits_run`` exported by the real CLI with ``flags`` (cached): its version 1."""
    args = [
        *("export", str(digits_run), "--repository", "{output}/repository"),
        *("--name", "digits", "--no-register", *flags),
    ]
    folder = cached_cli(
        "-".join(["digits-export", *(flag.strip("-") for flag in flags)]),
        args,
        valid=lambda folder: intact(folder / "repository" / "digits" / "1"),
    )
    return folder / "repository" / "digits" / "1"


@pytest.fixture(scope="session")
def digits_model(digits_run) -> Path:
    return exported_digits(digits_run)


@pytest.fixture(scope="session")
def test_split(digits_run) -> list[tuple[Image.Image, str]]:
    """``digits_run``'s test images (held out from training and never seen by it) as
    grayscale images, with their labels. A test that sends them as files encodes them
    (``tests.serving.cases.encode``)."""
    from training.datasets import read_manifest

    found = []
    for sample in read_manifest(digits_run)["test"]:
        with Image.open(sample.path) as image:
            found.append((image.convert("L").copy(), sample.label))
    return found
