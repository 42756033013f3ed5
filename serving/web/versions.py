"""The versions one worker serves: the live one, at most one shadow, and the switch between
them while requests keep coming.

Every request leases one ``ServedVersion`` (``serving.web.served``: its runtime, to decode
and answer, and its batcher) for its whole life, so an image decoded for one version is
never batched into another, whose input size may differ. A watcher thread reads the
repository's roles (``serving.core.roles``) every ``poll_s`` seconds; a new version is
loaded, verified (hashes, graph against metadata, the same classes) and warmed at every
batch size *before* the switch, which is one reference swap. The old version drains: its
leases finish on it, then its batcher closes and its sessions are freed. A version that
fails any check is refused (``serving.web.refusals``: a log line,
``imgclf_version_refusals_total``, ``/metadata``) and the one serving keeps serving.

The shadow gets a copy of a fraction of the live requests, after their answers are computed
(``serving.web.shadow``). ``serving.web.version_builder`` builds both.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

from monitoring.observers import VersionObserver
from serving.core.errors import ModelError, NotFoundError
from serving.core.model_dir import check_same_classes, is_model_root, version_numbers
from serving.core.roles import (
    Desired,
    load_live,
    read_state,
    resolve_roles,
    state_path,
    state_signature,
)
from serving.core.runtime import ClassifierRuntime
from serving.web.refusals import Refusals
from serving.web.served import Lease, ServedVersion, retire
from serving.web.shadow import ShadowCopies
from serving.web.version_builder import VersionBuilder

log = logging.getLogger(__name__)


class ModelSet:
    """The live version and the shadow of one worker, kept in line with the repository's
    roles by a watcher thread (only when serving ``repository/<name>``; a single version
    folder or a BentoML store model is served as it is)."""

    def __init__(
        self,
        source: Path,
        *,
        builder: VersionBuilder,
        poll_s: float,
        retire_after_s: float,
        observer: VersionObserver | None = None,
    ) -> None:
        self.root = Path(source) if is_model_root(source) else None
        self.builder = builder
        self.poll_s = poll_s
        self.retire_after_s = retire_after_s
        self.observer = observer
        self._lock = threading.Lock()
        #: Versions refused, with why (a version published again is tried again).
        self.refused = Refusals(self.root, observer)
        self.shadow: ShadowCopies | None = None
        self.following = "fixed"
        self.state_error: str | None = None
        self._signature = None
        self._stop = threading.Event()
        self.live = builder.live(self._first_runtime(source))
        self._report()

    # -- requests --------------------------------------------------------------------------

    def lease(self, version: int | None = None) -> Lease:
        """The live version (or the loaded ``version``, live or shadow) for one request."""
        with self._lock:
            served = (
                self.live if version in (None, self.live.version) else self._shadow_served(version)
            )
            served.in_flight += 1
        return Lease(served, self._lock)

    def _shadow_served(self, version: int) -> ServedVersion:
        shadow = self.shadow
        if shadow is None or shadow.version != version:
            raise NotFoundError(
                f"version {version} is not loaded here (live: {self.live.version}"
                + (f", shadow: {shadow.version}" if shadow else "")
                + ")"
            )
        return shadow.served

    def offer_shadow(
        self, served: ServedVersion, images: np.ndarray | None, blobs, live: np.ndarray
    ) -> None:
        shadow = self.shadow
        if shadow is not None and shadow.live_version == served.version:
            shadow.offer(images, blobs, live)

    @property
    def versions(self) -> list[int]:
        shadow = self.shadow
        return sorted({self.live.version} | ({shadow.version} if shadow else set()))

    # -- start-up ----------------------------------------------------------------------------

    def _first_runtime(self, source: Path) -> ClassifierRuntime:
        """The version to start with: the pinned one (which must load), or the newest one
        that loads (``model_dir.load_live``)."""
        if self.root is None:
            return self.builder.load(source)
        self._signature = state_signature(self.root)
        state = self._read_state()
        self.following = "newest" if state.follows_newest else "pinned"
        return load_live(self.root, state, self.builder.load, self._refuse)

    def start_watching(self) -> None:
        """Watch the repository's roles on a thread of their own (the first look loads a
        shadow set before this worker started)."""
        if self.root is None or self.poll_s <= 0:
            return
        threading.Thread(target=self._watch, name="versions", daemon=True).start()

    # -- the watcher -------------------------------------------------------------------------

    def _watch(self) -> None:
        force = True
        while not self._stop.is_set():
            try:
                self.refresh(force=force)
            except Exception:  # never let the watcher die silently
                log.exception("checking the model's versions failed")
            force = False
            self._stop.wait(self.poll_s)

    def refresh(self, force: bool = False) -> None:
        """Act on the repository's roles if they (or the published versions) changed."""
        retry = self.refused.forget_republished()
        signature = state_signature(self.root)
        if not force and not retry and signature == self._signature:
            return
        self._signature = signature
        try:
            state = self._read_state()
        except ModelError:
            return  # logged once; the versions served now stay
        for _ in range(len(version_numbers(self.root)) + 1):
            desired = resolve_roles(self.root, state, refused=set(self.refused))
            self.following = desired.following
            self._apply(desired)
            if desired.following == "pinned" or desired.live not in self.refused:
                return  # else: the newest was refused just now; the newest before it, then

    def _read_state(self):
        try:
            state = read_state(self.root)
        except ModelError as error:
            if self.state_error != error.message:
                log.error("%s; keeping the versions served now", error.message)
            self.state_error = error.message
            raise
        self.state_error = None
        return state

    def _apply(self, desired: Desired) -> None:
        if desired.live != self.live.version and desired.live not in self.refused:
            runtime = self._runtime_for(desired.live)
            if runtime is not None:
                self._switch_live(runtime)
        shadow = self.shadow
        wanted = (
            desired.shadow
            if desired.shadow and desired.shadow.version != self.live.version
            else None
        )
        if wanted is None:
            if shadow is not None:
                self._set_shadow(None)
        elif (
            shadow is None
            or shadow.version != wanted.version
            or shadow.live_version != self.live.version
        ):
            if wanted.version not in self.refused:
                runtime = self._runtime_for(wanted.version)
                if runtime is not None:
                    self._set_shadow(runtime, wanted.fraction)
        else:
            shadow.fraction = wanted.fraction

    def _runtime_for(self, version: int) -> ClassifierRuntime | None:
        """The warmed runtime of ``version``: the shadow's, or loaded now; None if refused."""
        shadow = self.shadow
        if shadow is not None and shadow.version == version:
            return shadow.served.runtime
        started = time.perf_counter()
        try:
            runtime = self.builder.load(self.root / str(version))
            live = self.live
            check_same_classes(version, runtime.classes, live.version, live.runtime.classes)
            runtime.warm_up()
        except ModelError as error:
            self._refuse(version, error.message)
            return None
        except Exception as error:  # ONNX Runtime's own load or run errors
            self._refuse(version, f"{type(error).__name__}: {error}")
            return None
        log.info(
            "version %d loaded, verified and warmed in %.2f s (batch sizes %s)",
            version,
            time.perf_counter() - started,
            ", ".join(map(str, runtime.warmed_batch_sizes)),
        )
        return runtime

    def _switch_live(self, runtime: ClassifierRuntime) -> None:
        served = self.builder.live(runtime)
        with self._lock:
            old, self.live = self.live, served
        log.info(
            "live version %d -> %d (pid %d); version %d finishes its %d request(s) in flight",
            old.version,
            served.version,
            os.getpid(),
            old.version,
            old.in_flight,
        )
        if self.observer is not None:
            self.observer.switched("live")
        retire(old, self.retire_after_s)
        self._report()

    def _set_shadow(self, runtime: ClassifierRuntime | None, fraction: float = 1.0) -> None:
        old = self.shadow
        new = None
        if runtime is not None:
            new = self.builder.shadow(runtime, self.live, fraction)
        with self._lock:
            self.shadow = new
        if new is not None:
            log.info(
                "shadow version %d gets %g of version %d's requests (pid %d)",
                new.version,
                fraction,
                self.live.version,
                os.getpid(),
            )
            if self.observer is not None:
                self.observer.switched("shadow")
        elif old is not None:
            log.info("shadow version %d stopped (pid %d)", old.version, os.getpid())
        if old is not None:
            old.close()
            retire(old.served, self.retire_after_s)
        self._report()

    def _refuse(self, version: int, reason: str) -> None:
        log.error(
            "version %d refused: %s; version %s keeps serving",
            version,
            reason,
            getattr(getattr(self, "live", None), "version", "none yet"),
        )
        self.refused.add(version, reason)

    def _report(self) -> None:
        if self.observer is not None:
            shadow = self.shadow
            self.observer.serving(self.live.version, shadow.version if shadow else None)

    # -- what /metadata says ------------------------------------------------------------------

    def describe(self) -> dict:
        """What ``/metadata`` says of the versions: file names relative to the model's
        folder, never the server's paths (``/metadata`` may be public, SECURITY.md)."""
        shadow = self.shadow

        def relative(text: str | None) -> str | None:
            return text.replace(f"{self.root}/", "") if text and self.root else text

        return {
            "live": self.live.version,
            "following": self.following,
            "shadow": shadow.describe() if shadow else None,
            "refused": {str(v): relative(reason) for v, reason in self.refused.reasons()},
            "state_file": state_path(self.root).name if self.root else None,
            "state_error": relative(self.state_error),
            "poll_interval_s": self.poll_s if self.root else None,
        }

    def close(self) -> None:
        self._stop.set()
        if self.shadow is not None:
            self.shadow.close()
            self.shadow.served.close()
        self.live.close()
