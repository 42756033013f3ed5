"""Where an export goes: the model's name, its folder in the repository, its version (the
next free one, or the one asked for) and the rename that publishes it. Kept apart from the
exporter, which imports TensorFlow (7 to 8 s), so that ``imgclf export`` refuses a bad name,
a taken version or a run that did not learn before it imports it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from serving.core.errors import ConfigError, ModelError
from serving.core.files import fsync_dir, fsync_tree
from serving.core.model_dir import check_model_name, version_numbers

#: Hidden folders an export builds in, next to its destination (same file system).
STAGING_PREFIX = ".staging-"


def destination(
    run_dir: Path,
    repository: Path,
    name: str | None,
    version: int | None,
    *,
    force: bool,
    taken_versions: Callable[[str], set[int]] | None = None,
) -> tuple[str, Path, int]:
    """The model's name (``name``, or the run directory's), its folder in ``repository`` and
    the version to publish; ``ConfigError`` for a bad name or a version that is taken."""
    name = check_model_name(name or default_name(run_dir))
    model_root = Path(repository) / name
    taken = taken_versions(name) if taken_versions is not None else set()
    return name, model_root, choose_version(model_root, version, force=force, taken=taken)


def check_learned(run_dir: Path, *, allow_unlearned: bool = False) -> None:
    """``ConfigError`` for a run whose training ended with "did not learn" (``imgclf train``
    exit 3, ``learning`` in its metrics.json), unless ``allow_unlearned``: such a model is
    published only when asked for. A run trained before that verdict existed passes."""
    if allow_unlearned:
        return
    try:
        metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot read {run_dir}/metrics.json ({error})") from None
    learning = metrics.get("learning") or {}
    if learning.get("learned", True):
        return
    raise ConfigError(
        f"{run_dir} did not learn (best validation accuracy "
        f"{learning['best_validation_accuracy']:.3f}, no better than chance or the largest "
        f"class, {learning['baseline_accuracy']:.3f}); give --allow-unlearned to publish it "
        "anyway"
    )


def default_name(run_dir: Path) -> str:
    """The run directory's name, made a valid model name."""
    cleaned = "".join(
        c if c.isalnum() or c in "-_." else "-" for c in run_dir.resolve().name.lower()
    )
    return cleaned.strip("-_.") or "model"


def choose_version(
    model_root: Path, version: int | None, *, force: bool, taken: set[int] = frozenset()
) -> int:
    """The next version free in the repository and in ``taken`` (BentoML's model store,
    which outlives a `make clean` of the repository), or ``version`` if it is free."""
    existing = version_numbers(model_root)
    if version is None:
        return max([0, *existing, *taken]) + 1
    if version in taken and not force:
        raise ConfigError(
            f"version {version} of {model_root.name} is already in BentoML's model store; "
            "pass --force to replace it, or leave --version out"
        )
    if version < 1:
        raise ConfigError(f"--version must be a positive integer, got {version}")
    if version in existing and not force:
        raise ConfigError(
            f"version {version} of {model_root.name} already exists; pass --force to replace it"
        )
    return version


def remove_stale_staging(model_root: Path) -> None:
    """Staging folders left by a crashed export; never seen by readers (dot-names)."""
    for leftover in model_root.glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def new_staging(model_root: Path, version: int) -> Path:
    """A hidden folder in ``model_root`` to build ``version`` in, crashed exports' removed."""
    model_root.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(model_root)
    return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{version}-", dir=model_root))


def publish(staging: Path, model_root: Path, version: int, *, force: bool) -> Path:
    """Rename ``staging`` into place as ``version`` (replacing it with ``force``)."""
    fsync_tree(staging)
    os.chmod(staging, 0o755)  # mkdtemp makes it 0700
    destination = model_root / str(version)
    retired = None
    if destination.exists():
        if not force:
            raise ConfigError(f"version {version} of {model_root.name} was published meanwhile")
        retired = model_root / f".retired-{version}-{os.getpid()}"
        os.rename(destination, retired)
    try:
        os.rename(staging, destination)
    except OSError as error:
        raise ConfigError(f"cannot publish {destination}: {error.strerror}") from error
    fsync_dir(model_root)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
    return destination
