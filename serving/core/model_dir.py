"""The published model directory: what is in it, how it is found, how it is verified.

``model_repository/<name>/<version>/`` is written by ``imgclf export`` and read by the service,
batch scoring and drift reports. It describes itself through ``metadata.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.core.errors import ConfigError, ModelError
from serving.core.files import sha256_file

METADATA = "metadata.json"
ONNX_MODEL = "model.onnx"
INT8_MODEL = "model.int8.onnx"
PARITY = "parity.json"
REFERENCE_PROFILE = "reference_profile.json"
SAVED_MODEL = "saved_model"
#: The label-free accuracy estimate's calibration (``monitoring.estimate``).
CALIBRATION = "calibration.json"
#: The embedding reduction and reference (``monitoring.embedding``): the arrays it holds.
EMBEDDING_REFERENCE = "embedding_reference.npz"
EMBEDDING_ARRAYS = ("mean", "scale", "components", "reference", "support_radius")
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
#: The optional second output: the penultimate features, for embedding drift.
EMBEDDING_NAME = "embedding"
#: The optional third output: the last rectified feature map (NHWC), for ``/explain``'s cam.
FEATURE_MAP_NAME = "feature_map"
#: The layers after that map, as arrays (``serving.core.cam.Head``).
EXPLANATION_HEAD = "explanation.npz"
#: What each file of a published version holds (the reference page is generated from this).
FILES = {
    METADATA: "The contract: classes, input size, preprocessing, metrics, versions, file hashes.",
    ONNX_MODEL: f"The canonical model: fp32, dynamic batch, NHWC float32 {INPUT_NAME!r} in "
    f"[0, 255] -> {OUTPUT_NAME!r} (softmax) and, optionally, {EMBEDDING_NAME!r} (the "
    "penultimate features, for embedding drift; /predict never returns them) and "
    f"{FEATURE_MAP_NAME!r} (the last rectified feature map, for /explain's cam), in that order.",
    INT8_MODEL: "Optional: static QDQ INT8, kept only if its held-out accuracy is within the gate.",
    SAVED_MODEL + "/": "TensorFlow SavedModel with a serving_default signature (not served).",
    REFERENCE_PROFILE: "What 'no drift' looks like on held-out data, with calibrated thresholds.",
    PARITY: "Keras vs SavedModel vs ONNX: the numbers behind the parity gate.",
    CALIBRATION: "The label-free accuracy estimate's temperature, fitted on the validation split.",
    EMBEDDING_REFERENCE: "The embedding reduction fitted at export (feature means, scales, "
    "components) and the reduced validation embeddings.",
    EXPLANATION_HEAD: f"The layers after {FEATURE_MAP_NAME!r}, as arrays: what /explain's cam "
    "differentiates (checked against TensorFlow in parity.json).",
}
#: The keys of metadata.json; those in REQUIRED_KEYS must be there for a server to start.
METADATA_FIELDS = {
    "name": "Model name (the repository folder's name).",
    "version": "Version number (the version folder's name).",
    "created_at": "When it was exported (ISO 8601, UTC).",
    "architecture": "seed-cnn, mobilenetv2, resnet50 or vgg16.",
    "classes": "Class names, in the order of the output's columns.",
    "input": "The graph's input: name, height, width, channels, layout, dtype.",
    "output": "The graph's output: name, kind, dtype.",
    "preprocessing": "The preprocessing contract serving applies (contract_version): size, "
    "resize filter, limits, the JPEG draft margin.",
    "metrics": "Held-out test metrics of the exported model.",
    "parity": "Summary of parity.json: max |difference| and top-1 agreement per format.",
    "int8": "Whether the INT8 model was kept, with both accuracies.",
    "explanation": f"What /explain's cam reads: the method, the {FEATURE_MAP_NAME!r} output, the "
    f"layer it comes from and its shape, the head's layers, the file ({EXPLANATION_HEAD}).",
    "opset": "The ONNX opset.",
    "versions": "Library versions that produced the files.",
    "source_run": "The training run it was exported from.",
    "files": "sha256 of every other file; a mismatch refuses the model.",
}
REQUIRED_KEYS = ("name", "version", "classes", "input", "preprocessing", "files")
#: A model's name: BentoML's tag rule, so that every published model can be registered in
#: its model store, checked when a model is published.
NAME_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")


def check_model_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise ConfigError(
            f"model name {name!r} must be lowercase letters, digits, '.', '_' or '-' "
            "(at most 63, starting and ending with a letter or digit)"
        )
    return name


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` except metadata.json, by relative POSIX path."""
    root = Path(root)
    return {
        path.relative_to(root).as_posix(): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.relative_to(root).as_posix() != METADATA
    }


def version_numbers(model_root: Path) -> list[int]:
    """Published versions under ``repository/<name>``, oldest first (dot-folders are staging)."""
    root = Path(model_root)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def is_model_root(path: Path) -> bool:
    """``repository/<name>``: a folder of numbered versions, not a version itself."""
    path = Path(path)
    return path.is_dir() and not (path / METADATA).is_file() and bool(version_numbers(path))


def check_same_classes(version: int, classes: list[str], reference: int, expected) -> None:
    """A version with another label set is another model: refused as a version of this one."""
    if list(classes) != list(expected):
        raise ModelError(
            f"version {version}'s classes differ from version {reference}'s (a different "
            "label set is a different model: publish it under another name)"
        )


def load_metadata(model_dir: Path) -> dict:
    path = Path(model_dir) / METADATA
    try:
        metadata = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(
            f"{model_dir} has no {METADATA}; is it a published model directory?"
        ) from None
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot read {path}: {error}") from error
    if not isinstance(metadata, dict):
        raise ModelError(f"{path} must hold a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in metadata]
    if missing:
        raise ModelError(f"{path} lacks {', '.join(missing)}")
    return metadata


def verify_files(model_dir: Path, metadata: dict, names: tuple[str, ...] | None = None) -> None:
    """Check sha256 of the listed files (all of them by default) against metadata.json."""
    model_dir = Path(model_dir)
    for name in names or tuple(metadata["files"]):
        path = _existing(model_dir / name)
        _check_hash(model_dir, metadata, name, sha256_file(path))


def read_verified(model_dir: Path, metadata: dict, name: str, *, missing_hint: str = "") -> bytes:
    """Read a file once and check those bytes: a file swapped after the check is never the one
    used."""
    model_dir = Path(model_dir)
    data = _existing(model_dir / name, missing_hint).read_bytes()
    _check_hash(model_dir, metadata, name, hashlib.sha256(data).hexdigest())
    return data


@dataclass(frozen=True)
class MonitoringFiles:
    """A version's monitoring references as its directory holds them, read, hash-checked and
    parsed; None for what it lacks (exported before they existed). ``monitoring`` makes its
    objects of them (``monitoring.estimate.monitoring_references``)."""

    #: ``reference_profile.json``: what "no drift" looks like.
    profile: dict | None = None
    #: ``calibration.json``: the label-free estimate's temperature.
    calibration: dict | None = None
    #: ``embedding_reference.npz``'s arrays (``EMBEDDING_ARRAYS``).
    embedding: dict[str, np.ndarray] | None = None


def read_monitoring_files(model_dir: Path, metadata: dict, *, embedding: bool) -> MonitoringFiles:
    """The monitoring references of a version (the embedding reference only if its graph has
    the ``embedding`` output), or a ``ModelError``: a version whose references cannot be read
    is refused where it is loaded, like one whose model cannot."""
    files = metadata["files"]

    def verified(name: str) -> bytes | None:
        return read_verified(model_dir, metadata, name) if name in files else None

    try:
        profile, calibration = verified(REFERENCE_PROFILE), verified(CALIBRATION)
        arrays = verified(EMBEDDING_REFERENCE) if embedding else None
        found = MonitoringFiles(
            json.loads(profile) if profile is not None else None,
            json.loads(calibration) if calibration is not None else None,
            _arrays(arrays) if arrays is not None else None,
        )
        if found.calibration is not None:
            float(found.calibration["temperature"])
    except ModelError:
        raise
    except Exception as error:  # hashed, yet unreadable: written so by a bad export
        raise ModelError(
            f"{model_dir}: its monitoring references cannot be read "
            f"({type(error).__name__}: {error})"
        ) from None
    return found


def _arrays(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as found:
        return {name: found[name] for name in EMBEDDING_ARRAYS}


def _existing(path: Path, hint: str = "") -> Path:
    if not path.is_file():
        raise ModelError(f"{path} is missing{hint}")
    return path


def _check_hash(model_dir: Path, metadata: dict, name: str, actual: str) -> None:
    expected = metadata["files"].get(name)
    if expected is None:
        raise ModelError(f"{METADATA} in {model_dir} has no hash for {name}")
    if actual != expected:
        raise ModelError(
            f"{model_dir / name} does not match its hash in {METADATA} "
            f"(expected {expected[:12]}..., got {actual[:12]}...): modified or corrupt"
        )
