"""The run directory: where each artifact of a run lives, and what ``--output`` may become (a
new run, an interrupted one resumed, or replaced) or why not.

No TensorFlow here, so that ``imgclf train`` refuses an ``--output`` it must not touch in
half a second, before TensorFlow loads (7 to 8 s), as it does a mistyped data folder; the
run itself checks again when it starts.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Literal

from serving.core.errors import ConfigError, ModelError
from serving.core.files import atomic_write
from training.config import Config, annotated_yaml, load_config

log = logging.getLogger(__name__)

BEST_MODEL = "best.keras"
STATE_FILE = "train_state.json"
HEAD_WEIGHTS = "head.weights.h5"


class RunPaths:
    """Where each artifact of a run directory lives."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.best = self.root / BEST_MODEL
        self.history = self.root / "history.csv"
        self.config = self.root / "config.yaml"
        self.metrics = self.root / "metrics.json"
        self.run = self.root / "run.json"
        self.state = self.root / STATE_FILE
        self.backup = self.root / "backup"
        self.plots = self.root / "plots"
        self.head_weights = self.root / HEAD_WEIGHTS


def check_checkpoint(path: Path) -> Path:
    """``path``, a run's checkpoint, if it is a file; a missing one is one clear error (the
    export command calls it before TensorFlow loads)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path} does not exist; is {path.parent} a finished training run?")
    return path


def check_run_dir(
    run: RunPaths, config: Config, *, force: bool
) -> Literal["new", "resume", "replace"]:
    """What training ``config`` into ``run`` does: start a new run, resume an interrupted
    one with the same configuration, or replace what is there; ``ConfigError`` when it must
    not.

    ``force`` replaces a finished run or one with another configuration, never a folder that
    is not a run directory. An earlier attempt that never finished an epoch (say, offline
    ImageNet weights) is replaced without ``force``: it holds nothing to lose, and refusing
    would block the very fix its error suggested.
    """
    root = run.root
    if not (root.exists() and any(root.iterdir())):
        return "new"
    if not run.config.exists():
        raise ConfigError(
            f"{root} is not empty and is not a run directory; choose another --output"
        )
    saved = load_config(run.config)
    if saved == config and not run.metrics.exists():
        return "resume"
    if not force:
        if run.metrics.exists():
            raise ConfigError(
                f"{root} already holds a finished run; choose another --output or pass --force"
            )
        if finished_an_epoch(run):
            changed = _diff(saved.model_dump(mode="json"), config.model_dump(mode="json"))
            raise ConfigError(
                f"{root} holds an interrupted run with a different config "
                f"({', '.join(changed[:4])}); rerun with the same options to resume, "
                "or pass --force to start over"
            )
    return "replace"


def prepare_run_dir(
    run: RunPaths, config: Config, *, force: bool, sources: dict[str, str] | None = None
) -> bool:
    """Make ``run`` ready for training ``config`` (see ``check_run_dir``); True when
    resuming."""
    verdict = check_run_dir(run, config, force=force)
    if verdict == "resume":
        log.info("resuming the interrupted run in %s", run.root)
        return True
    if verdict == "replace":
        if not force:
            log.info(
                "the earlier attempt in %s left nothing to resume; starting over there", run.root
            )
        shutil.rmtree(run.root)
    run.root.mkdir(parents=True, exist_ok=True)
    with atomic_write(run.config) as handle:
        handle.write(annotated_yaml(config, sources) if sources else config.to_yaml())
    return False


def finished_an_epoch(run: RunPaths) -> bool:
    """Each of these is written only at the end of an epoch (CSVLogger writes its header with
    the first row), so none of them means the run has nothing to resume."""
    if run.best.exists() or run.backup.exists() or run.head_weights.exists():
        return True
    return run.history.exists() and run.history.stat().st_size > 0


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested configurations."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys
