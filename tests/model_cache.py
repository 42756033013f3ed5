"""Expensive test artefacts (data sets, trained runs, exported models) built once and kept
between test sessions, as MLServer keeps its test models and BentoML trains its e2e model
once.

An artefact's folder is named by a key over everything that could change it: what the fixture
asks for, every source file of the code that builds it (training, the CLI, serving's core and
batch scoring, monitoring, the test data generator, the project's pins), the versions of the
libraries it runs on and the Python version. Change one line of that code and the key
changes, so a stale artefact is never read: it is built again. Building happens under a file
lock (one build, whichever pytest process or xdist worker asks first; the others wait, then
read it) in the artefact's final folder, whose ``.complete`` marker, written last, is what
makes it visible; an interrupted build is removed and redone. Artefacts refer to one another
by absolute path (a run's manifest names its images), which is why they are built in place.

The cache lives in ``$IMGCLF_TEST_CACHE``, by default ``~/.cache/imgclf/tests``; ``make
clean-test-cache`` (or removing the folder) empties it. Tests that change a model copy it
first; a cached model directory is checked against its own hashes whenever it is handed out.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: Every source that the artefacts' builders run: training and export (the CLI, training/,
#: serving's core, registry and batch scoring, monitoring's profile builders), the test
#: images' generator and the project's pins. Not serving/web, which only serves.
SOURCES = (
    "imgclf",
    "training",
    "serving/__init__.py",
    "serving/core",
    "serving/batch",
    "serving/registry.py",
    "monitoring",
    "tests/data.py",
    "pyproject.toml",
    "constraints.txt",
)
SUFFIXES = {".py", ".yaml", ".yml", ".toml", ".txt", ".json"}
PACKAGES = (
    "tensorflow-cpu",
    "keras",
    "tf2onnx",
    "onnx",
    "onnxruntime",
    "numpy",
    "scikit-learn",
    "pillow",
    "protobuf",
)
MARKER = ".complete"
#: Artefacts not used for this long are removed when another one is built (their keys belong
#: to code that has moved on).
UNUSED_FOR_S = 7 * 86400


def cache_root() -> Path:
    configured = os.environ.get("IMGCLF_TEST_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "imgclf" / "tests"


@functools.cache
def code_fingerprint() -> str:
    """A digest of every source in ``SOURCES``, the libraries' versions and Python's."""
    digest = hashlib.sha256()
    for source in SOURCES:
        path = REPO / source
        files = [path] if path.is_file() else sorted(path.rglob("*"))
        for file in files:
            if file.is_file() and file.suffix in SUFFIXES and "__pycache__" not in file.parts:
                digest.update(file.relative_to(REPO).as_posix().encode() + b"\0")
                digest.update(file.read_bytes() + b"\0")
    for package in PACKAGES:
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            version = "-"
        digest.update(f"{package}=={version}\0".encode())
    digest.update(platform.python_version().encode())
    return digest.hexdigest()


def key_of(kind: str, recipe: dict) -> str:
    text = json.dumps({"kind": kind, "recipe": recipe, "code": code_fingerprint()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cached(
    kind: str,
    recipe: dict,
    build: Callable[[Path], None],
    *,
    valid: Callable[[Path], bool] = lambda folder: True,
) -> Path:
    """The folder of the artefact ``kind`` made by ``build(folder)`` from ``recipe`` (JSON:
    the fixture's arguments, and the paths of the artefacts it reads, which carry their own
    keys); built now unless a complete, ``valid`` copy is cached."""
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"{kind}-{key_of(kind, recipe)}"
    if (folder / MARKER).exists() and valid(folder):
        (folder / MARKER).touch()  # its last use
        return folder
    with _locked(root / f"{folder.name}.lock"):
        if (folder / MARKER).exists() and valid(folder):
            return folder  # another process built it while this one waited
        if folder.exists():
            shutil.rmtree(folder)  # interrupted, or changed since (not valid)
        folder.mkdir()
        try:
            build(folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        (folder / MARKER).write_text(json.dumps({"kind": kind, "recipe": recipe}, indent=2))
    _forget_unused(root)
    return folder


def _forget_unused(root: Path) -> None:
    """Remove the artefacts nobody has used for ``UNUSED_FOR_S``."""
    now = time.time()
    for marker in root.glob(f"*/{MARKER}"):
        if now - marker.stat().st_mtime > UNUSED_FOR_S:
            with contextlib.suppress(OSError):
                with _locked(root / f"{marker.parent.name}.lock"):
                    shutil.rmtree(marker.parent)
                (root / f"{marker.parent.name}.lock").unlink()
