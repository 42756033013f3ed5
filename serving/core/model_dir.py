"""The published model directory: what is in it, how it is found, how it is verified.

``model_repository/<name>/<version>/`` is written by ``imgclf export`` and read by the service,
batch scoring and drift reports. It describes itself through ``metadata.json``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from monitoring.embedding import EMBEDDING_REFERENCE
from monitoring.estimate import CALIBRATION
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
#: The optional second output: the penultimate features, for embedding drift.
EMBEDDING_NAME = "embedding"
#: What each file of a published version holds (the reference page is generated from this).
FILES = {
    METADATA: "The contract: classes, input size, preprocessing, metrics, versions, file hashes.",
    ONNX_MODEL: f"The canonical model: fp32, dynamic batch, NHWC float32 {INPUT_NAME!r} in "
    f"[0, 255] -> {OUTPUT_NAME!r} (softmax) and, optionally, {EMBEDDING_NAME!r} (the "
    "penultimate features, for embedding drift; /predict never returns them).",
    INT8_MODEL: "Optional: static QDQ INT8, kept only if its held-out accuracy is within the gate.",
    SAVED_MODEL + "/": "TensorFlow SavedModel with a serving_default signature (not served).",
    REFERENCE_PROFILE: "What 'no drift' looks like on held-out data, with calibrated thresholds.",
    PARITY: "Keras vs SavedModel vs ONNX: the numbers behind the parity gate.",
    CALIBRATION: "The label-free accuracy estimate's temperature, fitted on the validation split.",
    EMBEDDING_REFERENCE: "The embedding reduction fitted at export (feature means, scales, "
    "components) and the reduced validation embeddings.",
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
STATE_FILE = "versions.json"


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
    """Accept ``repository/<name>/<version>`` or ``repository/<name>`` (its live version:
    the one ``versions.json`` pins, else the newest)."""
    path = Path(path)
    if (path / METADATA).is_file():
        return path
    if version_numbers(path):
        return path / str(resolve_roles(path, read_state(path)).live)
    if not path.exists():
        raise ModelError(f"model directory {path} does not exist")
    raise ModelError(f"{path} is not a model directory (no {METADATA}, no numbered versions)")


# -- roles: which version answers and which one shadows it -----------------------------------
# One small file in ``repository/<name>/``, written atomically by the ``imgclf`` commands
# (``serving.core.roles``) and read by every worker of every server that mounts the folder:
#
#     {"live": 2, "shadow": {"version": 3, "fraction": 0.5}, "history": [1], ...}
#
# ``live: null`` (or no file at all) follows the newest published version, TF Serving's
# "latest" policy: ``imgclf export`` of a new version is served with no other command. A
# number pins that version. ``history`` holds the earlier live versions, newest last, for
# ``imgclf rollback``.

#: Earlier live versions kept for rollback.
HISTORY_LIMIT = 20


@dataclass(frozen=True)
class Shadow:
    version: int
    fraction: float

    def __post_init__(self) -> None:
        # What the command refuses, the workers refuse too (a hand-edited file).
        if not 0 < self.fraction <= 1:
            raise ValueError(f"a shadow's fraction must be in (0, 1], got {self.fraction:g}")
        if self.version < 1:
            raise ValueError(f"versions are numbered from 1, got {self.version}")


@dataclass(frozen=True)
class RoleState:
    """The roles the repository asks for. ``live`` None: the newest version."""

    live: int | None = None
    shadow: Shadow | None = None
    history: tuple[int, ...] = ()
    updated_at: str | None = None
    updated_by: str | None = None

    @property
    def follows_newest(self) -> bool:
        return self.live is None

    def to_json(self) -> dict:
        return {
            "live": self.live,
            "shadow": asdict(self.shadow) if self.shadow else None,
            "history": list(self.history),
            "updated_at": self.updated_at,
            "updated_by": self.updated_by,
        }


@dataclass(frozen=True)
class Desired:
    """What a worker should serve now: resolved version numbers."""

    live: int
    shadow: Shadow | None = None
    following: str = "newest"


def state_path(model_root: Path) -> Path:
    return Path(model_root) / STATE_FILE


def is_model_root(path: Path) -> bool:
    """``repository/<name>``: a folder of numbered versions, not a version itself."""
    path = Path(path)
    return path.is_dir() and not (path / METADATA).is_file() and bool(version_numbers(path))


def read_state(model_root: Path) -> RoleState:
    """The state file, or the default (follow the newest) when there is none."""
    path = state_path(model_root)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return RoleState()
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot read {path}: {error}") from None
    try:
        shadow = raw.get("shadow")
        return RoleState(
            live=_optional_int(raw.get("live")),
            shadow=Shadow(int(shadow["version"]), float(shadow["fraction"])) if shadow else None,
            history=tuple(int(v) for v in raw.get("history") or ()),
            updated_at=raw.get("updated_at"),
            updated_by=raw.get("updated_by"),
        )
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise ModelError(
            f"{path} is not a versions file ({type(error).__name__}: {error})"
        ) from None


def state_signature(model_root: Path) -> tuple:
    """Changes whenever the state file or the set of published versions changes: what a
    worker compares between two polls (a stat and a directory listing)."""
    try:
        stat = state_path(model_root).stat()
        file_sig = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    except FileNotFoundError:
        file_sig = None
    return file_sig, tuple(version_numbers(model_root))


def resolve_roles(model_root: Path, state: RoleState, refused=frozenset()) -> Desired:
    """The versions to serve: the pinned live version, or the newest one not ``refused``."""
    published = version_numbers(model_root)
    if not published:
        raise ModelError(f"{model_root} holds no published version")
    if state.live is not None:
        live, following = state.live, "pinned"
    else:
        live, following = ([v for v in published if v not in refused] or published)[-1], "newest"
    shadow = state.shadow if state.shadow and state.shadow.version != live else None
    return Desired(live, shadow, following)


def load_live(model_root: Path, state: RoleState, load: Callable, on_refused: Callable):
    """``load(folder)`` of the version to start on: the pinned one, or the newest one that
    loads (each newer one that does not is passed to ``on_refused(version, reason)`` and the
    one before it tried). The last one tried fails as ``load`` fails."""
    candidates = [state.live] if state.live is not None else version_numbers(model_root)[::-1]
    for version in candidates[:-1]:
        try:
            return load(Path(model_root) / str(version))
        except ModelError as error:
            on_refused(version, error.message)
        except Exception as error:  # ONNX Runtime's own load errors
            on_refused(version, f"{type(error).__name__}: {error}")
    return load(Path(model_root) / str(candidates[-1]))


def check_same_classes(version: int, classes: list[str], reference: int, expected) -> None:
    """A version with another label set is another model: refused as a version of this one."""
    if list(classes) != list(expected):
        raise ModelError(
            f"version {version}'s classes differ from version {reference}'s (a different "
            "label set is a different model: publish it under another name)"
        )


def _optional_int(value) -> int | None:
    return None if value is None else int(value)


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
