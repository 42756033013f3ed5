"""Image folders: find the classes and files, write the built-in digits, split and record the split.

No TensorFlow here, so that export and drift profiling can read a run's split cheaply.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from serving.core.errors import ConfigError, DataError, InvalidImageError, ModelError
from serving.core.files import atomic_write
from serving.core.preprocessing import IMAGE_SUFFIXES, PreprocessSpec, decode, read_image_file

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
MANIFEST_NAME = "manifest.csv"


@dataclass(frozen=True)
class Sample:
    path: Path
    label: str


@dataclass
class ImageFolder:
    root: Path
    classes: list[str]
    samples: list[Sample]


def default_data_home() -> Path:
    return Path(os.environ.get("IMGCLF_DATA_HOME", Path.home() / ".cache" / "imgclf"))


def class_folders(root: Path) -> list[Path]:
    """``root``'s class sub-folders, sorted, or the mistake in one line. Quick (the folders
    are listed, not their images): ``imgclf train`` checks them before TensorFlow loads."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(
            f"data folder {root} has no class sub-folders (expected {root}/<class>/*.png)"
        )
    if len(class_dirs) == 1:
        raise DataError(
            f"data folder {root} has one class ({class_dirs[0].name}); need at least two"
        )
    return class_dirs


def discover(root: Path) -> ImageFolder:
    """List ``root/<class>/<image>``; errors name the folder a user has to fix."""
    root = Path(root)
    class_dirs = class_folders(root)
    samples: list[Sample] = []
    for class_dir in class_dirs:
        files = sorted(
            p
            for p in class_dir.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        if not files:
            raise DataError(
                f"class folder {class_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})"
            )
        samples.extend(Sample(path, class_dir.name) for path in files)
    return ImageFolder(root, [d.name for d in class_dirs], samples)


def write_digits(data_home: Path | None = None) -> Path:
    """Write scikit-learn's 1,797 bundled 8x8 digit scans as PNG files, once, atomically."""
    from PIL import Image
    from sklearn.datasets import load_digits

    target = Path(data_home or default_data_home()) / "digits"
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    staging = Path(tempfile.mkdtemp(prefix=".digits-", dir=target.parent))
    try:
        # 0..16 ink levels to 0..255 grey levels: white digits on black, as scanned.
        pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
        for index, (image, label) in enumerate(zip(pixels, digits.target, strict=True)):
            class_dir = staging / str(int(label))
            class_dir.mkdir(exist_ok=True)
            Image.fromarray(image, mode="L").save(class_dir / f"digit_{index:04d}.png")
        (staging / ".complete").write_text(f"{len(pixels)} images\n")
        if target.exists():  # an older, incomplete copy
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def check_readable(
    samples: list[Sample], spec: PreprocessSpec, *, workers: int | None = None
) -> tuple[list[Sample], list[dict[str, str]]]:
    """Decode every file once with the serving decoder; return the good and the skipped."""

    def problem(sample: Sample) -> str | None:
        try:
            decode(read_image_file(sample.path, spec), spec)
        except InvalidImageError as error:
            return error.message
        return None

    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 2) * 2)) as pool:
        problems = list(
            tqdm(
                pool.map(problem, samples),
                total=len(samples),
                desc="checking images",
                unit="img",
                disable=None,
            )
        )
    good, skipped = [], []
    for sample, message in zip(samples, problems, strict=True):
        if message is None:
            good.append(sample)
        else:
            log.warning("skipping %s: %s", sample.path, message)
            skipped.append({"path": str(sample.path), "error": message})
    return good, skipped


def split_samples(
    samples: list[Sample],
    classes: list[str],
    *,
    validation_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, list[Sample]]:
    """Stratified, seeded train/validation/test split; every class must reach every split."""
    from sklearn.model_selection import train_test_split

    counts = {name: 0 for name in classes}
    for sample in samples:
        counts[sample.label] += 1
    empty = [name for name, count in counts.items() if count == 0]
    if empty:
        raise DataError(f"class {empty[0]} has no readable images")
    too_small = [name for name, count in counts.items() if count < 3]
    if too_small:
        raise DataError(
            f"class {too_small[0]} has {counts[too_small[0]]} readable images; "
            "each class needs at least 3 (one per split)"
        )
    labels = [s.label for s in samples]
    held_out = validation_fraction + test_fraction
    try:
        train, rest = train_test_split(
            samples, test_size=held_out, stratify=labels, random_state=seed
        )
        validation, test = train_test_split(
            rest,
            test_size=test_fraction / held_out,
            stratify=[s.label for s in rest],
            random_state=seed,
        )
    except ValueError as error:
        raise DataError(f"cannot split the data set with these fractions: {error}") from error
    return {"train": train, "validation": validation, "test": test}


def write_manifest(run_dir: Path, splits: dict[str, list[Sample]]) -> Path:
    path = Path(run_dir) / MANIFEST_NAME
    with atomic_write(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        for split in SPLITS:
            for sample in sorted(splits[split], key=lambda s: str(s.path)):
                writer.writerow([str(Path(sample.path).resolve()), sample.label, split])
    return path


def read_run(run_dir: Path) -> dict:
    """A finished training run's ``run.json``, after checking that the run has what an export
    needs. Without TensorFlow: ``imgclf export`` calls it first, so that a mistyped path
    fails in a second, not after the ten it takes to import TensorFlow."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist")
    for required in ("run.json", "metrics.json", MANIFEST_NAME):
        if not (run_dir / required).is_file():
            raise ModelError(f"{run_dir} has no {required}; is it a finished training run?")
    return json.loads((run_dir / "run.json").read_text())


def read_manifest(run_dir: Path) -> dict[str, list[Sample]]:
    path = Path(run_dir) / MANIFEST_NAME
    if not path.exists():
        raise DataError(f"{run_dir} has no {MANIFEST_NAME}; is it a training run directory?")
    splits: dict[str, list[Sample]] = {name: [] for name in SPLITS}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            splits[row["split"]].append(Sample(Path(row["path"]), row["label"]))
    return splits
