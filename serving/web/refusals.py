"""The versions a worker refused, and why: a version that fails its checks (hashes, graph,
classes, warm-up) is not tried again on every poll, until its files change (fixed, or
published again), when it is forgiven and tried afresh."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from monitoring.observers import VersionObserver


class Refusals:
    """Refused version numbers with the reason and the stamp of their files when refused
    (``version in refusals``, ``set(refusals)``)."""

    def __init__(self, root: Path | None, observer: VersionObserver | None = None) -> None:
        #: The model's folder (``repository/<name>``), or None when serving one version.
        self.root = root
        self.observer = observer
        self._refused: dict[int, tuple[str, tuple]] = {}

    def __contains__(self, version: object) -> bool:
        return version in self._refused

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._refused))

    def add(self, version: int, reason: str) -> None:
        self._refused[version] = (reason, self._stamp(version))
        if self.observer is not None:
            self.observer.refused(version)

    def reasons(self) -> list[tuple[int, str]]:
        """(version, why), oldest version first."""
        return [(version, reason) for version, (reason, _) in sorted(self._refused.items())]

    def forget_republished(self) -> bool:
        """Forget refusals of versions whose files changed since (fixed, or published
        again): True when there is one to try again."""
        changed = [v for v, (_, stamp) in self._refused.items() if self._stamp(v) != stamp]
        for version in changed:
            del self._refused[version]
            if self.observer is not None:
                self.observer.forgiven(version)
        return bool(changed)

    def _stamp(self, version: int) -> tuple:
        """Every file of ``version`` (name, size, time, inode): a refused version whose
        files change, a side file restored as much as ``model.onnx``, is tried again."""
        if self.root is None:
            return ()
        folder = self.root / str(version)
        try:
            return tuple(
                (path.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns, stat.st_ino)
                for path in sorted(folder.rglob("*"))
                if path.is_file()
                for stat in (path.stat(),)
            )
        except OSError:
            return ()
