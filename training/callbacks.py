"""Keras callbacks for a run directory that can be killed at any moment and resumed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import keras

from serving.core.files import fsync_dir, write_json

BEST_STATE = "best.json"


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint(save_best_only=True) that writes a temporary file and renames it, so a
    crash never leaves a half-written ``best.keras``; remembers the best score across resumes."""

    def __init__(self, filepath: Path, monitor: str = "val_accuracy", **kwargs) -> None:
        self.final_path = Path(filepath)
        self.state_path = self.final_path.parent / BEST_STATE
        previous = read_best_state(self.final_path.parent)
        partial = self.final_path.with_name(f".{self.final_path.stem}.partial.keras")
        super().__init__(
            str(partial),
            monitor=monitor,
            mode="max" if "acc" in monitor else "min",
            save_best_only=True,
            initial_value_threshold=previous.get(monitor) if previous else None,
            **kwargs,
        )

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        before = self.best
        super().on_epoch_end(epoch, logs)
        partial = Path(self.filepath)
        if self.best != before and partial.exists():
            with open(partial, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(partial, self.final_path)
            fsync_dir(self.final_path.parent)
            write_json(self.state_path, {"epoch": epoch + 1, self.monitor: float(self.best)})


def read_best_state(run_dir: Path) -> dict:
    path = Path(run_dir) / BEST_STATE
    return json.loads(path.read_text()) if path.exists() else {}
