"""The roles file: which version of a model answers and which one shadows it.

One small file in ``repository/<name>/``, written atomically by the ``imgclf`` commands
(``serving.core.releases``) under a lock, and read by every worker of every server that
mounts the folder (``serving.web.versions``) and by ``imgclf versions``:

    {"live": 2, "shadow": {"version": 3, "fraction": 0.5}, "history": [1], ...}

``live: null`` (or no file at all) follows the newest published version, TF Serving's
"latest" policy: ``imgclf export`` of a new version is served with no other command. A
number pins that version. ``history`` holds the earlier live versions, newest last, for
``imgclf rollback``.
"""

from __future__ import annotations

import contextlib
import datetime
import getpass
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from serving.core.errors import ConfigError, ModelError
from serving.core.files import LockTimeoutError, locked, write_json
from serving.core.model_dir import METADATA, is_model_root, version_numbers

STATE_FILE = "versions.json"
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


def _optional_int(value) -> int | None:
    return None if value is None else int(value)


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


#: Held by a command from reading the roles to writing them, in the model's folder.
LOCK_FILE = ".versions.lock"
#: How long a command waits for another one that changes the same model's roles.
LOCK_WAIT_S = 60.0


@contextlib.contextmanager
def changing(model_root: Path) -> Iterator[Path]:
    """The model's folder, while this command alone changes its roles: two commands at once
    (``promote 2`` and ``promote 3``) take turns, each reading what the other wrote, instead
    of the second overwriting the first (8 promotions of 20 were lost that way)."""
    root = model_root_of(model_root)
    try:
        with locked(root / LOCK_FILE, timeout_s=LOCK_WAIT_S):
            yield root
    except OSError as error:
        raise ConfigError(
            f"cannot change the versions of {root.name}: {error.strerror or error} "
            f"({root}: the folder must be writable where you run imgclf)"
        ) from None
    except LockTimeoutError:
        raise ConfigError(
            f"another imgclf command has been changing the versions of {root.name} for "
            f"{LOCK_WAIT_S:g} s; try again when it is done (or remove {root / LOCK_FILE} if "
            "no such command runs)"
        ) from None


def write_state(model_root: Path, state: RoleState, command: str) -> RoleState:
    stamped = replace(
        state,
        history=state.history[-HISTORY_LIMIT:],
        updated_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        updated_by=f"imgclf {command} ({_user()})",
    )
    try:
        write_json(state_path(model_root), stamped.to_json())
    except OSError as error:
        raise ConfigError(
            f"cannot write {state_path(model_root)}: {error.strerror or error}"
        ) from None
    return stamped


def model_root_of(path: Path) -> Path:
    path = Path(path)
    if (path / METADATA).is_file():
        raise ConfigError(
            f"{path} is one version; give the model's folder ({path.parent}), which holds "
            "its numbered versions"
        )
    if not is_model_root(path):
        raise ConfigError(f"{path} is not a model folder (no numbered versions in it)")
    return path


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for this uid (a container)
        return "unknown user"
