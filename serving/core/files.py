"""Files that readers may pick up at any moment are written whole or not at all."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


class atomic_write:  # noqa: N801 - used like open()
    """Open a temporary file next to ``path``; on success fsync it and rename it into place."""

    def __init__(self, path: str | Path, mode: str = "w", **kwargs) -> None:
        self.path = Path(path)
        self.mode = mode
        self.kwargs = kwargs

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        os.fchmod(fd, 0o666 & ~_current_umask())  # mkstemp makes 0600; match open()
        self.handle = os.fdopen(fd, self.mode, **self.kwargs)
        return self.handle

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.handle.flush()
                os.fsync(self.handle.fileno())
            self.handle.close()
            if exc_type is None:
                os.replace(self.tmp, self.path)
                fsync_dir(self.path.parent)
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)


def write_json(path: str | Path, payload) -> None:
    """JSON, indented, written atomically."""
    with atomic_write(path) as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder under ``root`` before it is renamed into view."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as handle:
                os.fsync(handle.fileno())
        fsync_dir(folder)


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


class LockTimeoutError(Exception):
    """``locked`` waited ``timeout_s`` for a lock another process holds."""


@contextlib.contextmanager
def locked(path: str | Path, timeout_s: float | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created when missing): one process at a time,
    on local file systems and on NFS where its lock manager runs. ``OSError`` when the file
    cannot be opened (a read-only folder); ``LockTimeoutError`` after ``timeout_s``."""
    with open(path, "a") as handle:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (fcntl.LOCK_NB if deadline else 0))
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeoutError(f"{path} held for {timeout_s:g} s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
