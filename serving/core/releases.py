"""Releasing versions: the ``imgclf shadow``, ``promote``, ``rollback`` and ``pin``
commands (``imgclf versions`` reports them: ``serving.core.version_report``). Each checks
the version as a server would load it, then rewrites the roles file (``serving.core.roles``)
under its lock; every worker of every server that mounts the folder acts on it within its
poll interval (``serving.web.versions``).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from serving.core.errors import ConfigError, ModelError
from serving.core.model_dir import check_same_classes, load_metadata, version_numbers
from serving.core.roles import (
    RoleState,
    Shadow,
    changing,
    model_root_of,
    read_state,
    resolve_roles,
    write_state,
)


def check_version(model_root: Path, version: int, *, classes_of: int | None = None) -> dict:
    """Load ``version`` as a server would (every hashed file, the graph against metadata,
    the monitoring references, one batch) and check that it has the same classes as version
    ``classes_of``; its metadata, or a ``ModelError`` saying why not."""
    from serving.core.runtime import ClassifierRuntime

    logging.getLogger("serving.core.sessions").setLevel(logging.WARNING)  # one line per command
    folder = published(model_root, version)
    try:
        runtime = ClassifierRuntime(
            folder, provider="cpu", session_mode="shared", max_batch_size=1, buckets=(1,)
        ).verify()
        runtime.warm_up((1,))
    except ModelError as error:
        raise ModelError(f"version {version} does not verify: {error.message}") from None
    except Exception as error:  # ONNX Runtime's own load errors
        raise ModelError(
            f"version {version} does not load: {type(error).__name__}: {error}"
        ) from None
    if classes_of is not None and classes_of != version:
        expected = load_metadata(Path(model_root) / str(classes_of))["classes"]
        check_same_classes(version, runtime.classes, classes_of, expected)
    return runtime.metadata


def published(model_root: Path, version: int) -> Path:
    """The folder of ``version``, or a ``ModelError`` naming the versions there are."""
    numbers = version_numbers(model_root)
    if version not in numbers:
        raise ModelError(
            f"no version {version} in {model_root} (published: "
            f"{', '.join(map(str, numbers)) or 'none'})"
        )
    return Path(model_root) / str(version)


def current_live(model_root: Path, state: RoleState | None = None) -> int:
    """The version that answers: the pinned one, or the newest one that verifies, as servers
    following the newest serve it (the newest, when none does)."""
    state = state if state is not None else read_state(model_root)
    if state.live is None:
        served = next(
            (v for v in version_numbers(model_root)[::-1] if _verifies(model_root, v)), None
        )
        if served is not None:
            return served
    return resolve_roles(model_root, state).live


def promote(model_root: Path, version: int) -> RoleState:
    """``version`` answers from now on (pinned); the live version it replaces can be rolled
    back to; a shadow of the same version stops shadowing."""
    with changing(model_root) as root:
        state = read_state(root)
        before = current_live(root, state)
        check_version(root, version, classes_of=before)
        shadow = None if state.shadow and state.shadow.version == version else state.shadow
        history = state.history + ((before,) if before != version else ())
        return write_state(
            root, replace(state, live=version, shadow=shadow, history=history), "promote"
        )


def pin(model_root: Path, version: int | None) -> RoleState:
    """Pin ``version`` (None: follow the newest again). Either is checked first: a newest
    version that does not verify is refused, since servers following the newest would refuse
    it too and serve an older one than the command said."""
    with changing(model_root) as root:
        state = read_state(root)
        before = current_live(root, state)
        if version is not None:
            check_version(root, version, classes_of=before)
        else:
            _check_newest(root, classes_of=before)
        history = state.history + ((before,) if version != before else ())
        return write_state(root, replace(state, live=version, history=history), "pin")


def _check_newest(root: Path, *, classes_of: int) -> None:
    """The newest version verifies, or a ``ModelError`` saying why not and which version
    servers following the newest would serve instead (the newest one that verifies)."""
    newest, *older = version_numbers(root)[::-1]
    try:
        check_version(root, newest, classes_of=classes_of)
    except ModelError as error:
        instead = next((v for v in older if _verifies(root, v, classes_of)), None)
        served = (
            f"serve version {instead} (the newest that verifies); pin {instead}, or fix "
            f"version {newest} first"
            if instead is not None
            else f"serve none, since no version verifies; fix version {newest} first"
        )
        raise ModelError(
            f"{error.message}; servers following the newest would refuse it and {served}"
        ) from None


def _verifies(root: Path, version: int, classes_of: int | None = None) -> bool:
    try:
        check_version(root, version, classes_of=classes_of)
    except ModelError:
        return False
    return True


def rollback(model_root: Path) -> tuple[int, int]:
    """Back to the previous live version: (from, to)."""
    with changing(model_root) as root:
        state = read_state(root)
        if not state.history:
            raise ModelError(f"no earlier live version of {root.name} to roll back to")
        before = current_live(root, state)
        target = state.history[-1]
        check_version(root, target)
        write_state(root, replace(state, live=target, history=state.history[:-1]), "rollback")
        return before, target


def set_shadow(model_root: Path, version: int | None, fraction: float = 1.0) -> RoleState:
    """Send a copy of ``fraction`` of live requests to ``version`` (None: no shadow)."""
    try:
        wanted = None if version is None else Shadow(version, fraction)
    except ValueError as error:  # the rules the workers apply to the file too
        if not 0 < fraction <= 1:
            raise ConfigError(f"--fraction must be in (0, 1], got {fraction:g}") from None
        raise ConfigError(str(error)) from None
    with changing(model_root) as root:
        state = read_state(root)
        if wanted is None:
            return write_state(root, replace(state, shadow=None), "shadow")
        live = current_live(root, state)
        if version == live:
            raise ConfigError(f"version {version} is live; a shadow must be another version")
        check_version(root, version, classes_of=live)
        return write_state(root, replace(state, shadow=wanted), "shadow")


def version_dir(model: Path, version: int | None) -> Path:
    """``model`` itself, or version ``version`` of the model folder ``model``."""
    return Path(model) if version is None else published(model_root_of(model), version)
