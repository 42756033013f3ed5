"""The published model directory: what is in it, how it is found, how it is verified.

``model_repository/<name>/<version>/`` is written by ``imgclf export`` and read by the service,
batch scoring and drift reports. It describes itself through ``metadata.json``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from serving.core.errors import ModelError
from serving.core.files import sha256_file

METADATA = "metadata.json"
ONNX_MODEL = "model.onnx"
INT8_MODEL = "model.int8.onnx"
PARITY = "parity.json"
REFERENCE_PROFILE = "reference_profile.json"
SAVED_MODEL = "saved_model"
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
#: What each file of a published version holds (the reference page is generated from this).
FILES = {
    METADATA: "The contract: classes, input size, preprocessing, metrics, versions, file hashes.",
    ONNX_MODEL: f"The canonical model: fp32, dynamic batch, NHWC float32 {INPUT_NAME!r} in "
    f"[0, 255] -> {OUTPUT_NAME!r} (softmax).",
    INT8_MODEL: "Optional: static QDQ INT8, kept only if its held-out accuracy is within the gate.",
    SAVED_MODEL + "/": "TensorFlow SavedModel with a serving_default signature (not served).",
    REFERENCE_PROFILE: "What 'no drift' looks like on held-out data, with calibrated thresholds.",
    PARITY: "Keras vs SavedModel vs ONNX: the numbers behind the parity gate.",
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
    "opset": "The ONNX opset.",
    "versions": "Library versions that produced the files.",
    "source_run": "The training run it was exported from.",
    "files": "sha256 of every other file; a mismatch refuses the model.",
}
REQUIRED_KEYS = ("name", "version", "classes", "input", "preprocessing", "files")


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


def resolve_model_dir(path: Path) -> Path:
    """Accept ``repository/<name>/<version>`` or ``repository/<name>`` (newest version)."""
    path = Path(path)
    if (path / METADATA).is_file():
        return path
    versions = version_numbers(path)
    if versions:
        return path / str(versions[-1])
    if not path.exists():
        raise ModelError(f"model directory {path} does not exist")
    raise ModelError(f"{path} is not a model directory (no {METADATA}, no numbered versions)")


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
