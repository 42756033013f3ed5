"""The versions one worker serves: the live one, at most one shadow, and the switch between
them while requests keep coming.

Every request leases one ``ServedVersion`` (its card, to decode and answer, and its
batcher) for its whole life, so an image decoded for one version is never batched into
another, whose input size may differ. A watcher thread reads the repository's roles
(``serving.core.roles``) every ``poll_s`` seconds; a new version is loaded, verified
(hashes, graph against metadata, the same classes) and warmed at every batch size *before*
the switch, which is one reference swap. The old version drains: its leases finish on it,
then its batcher closes and its sessions are freed. A version that fails any check is
refused (a log line, ``imgclf_version_refusals_total``, ``/metadata``) and the one serving
keeps serving.

The shadow gets a copy of a fraction of the live requests, after their answers are computed,
through a bounded queue drained by a thread of its own: it never delays a live answer, and
copies are dropped (and counted) when it falls behind.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from monitoring.assessment import Answers
from monitoring.observers import VersionObserver
from monitoring.shadow import ShadowObserver
from serving.core.errors import ModelError, NotFoundError
from serving.core.model_dir import (
    Desired,
    check_same_classes,
    is_model_root,
    load_live,
    read_state,
    resolve_roles,
    state_path,
    state_signature,
    version_numbers,
)
from serving.core.runtime import ClassifierRuntime
from serving.core.sessions import release_freed_memory
from serving.web.batcher import AdaptiveBatcher

log = logging.getLogger(__name__)


class ServedVersion:
    """One loaded version in one role: its runtime (shared when a shadow is promoted), its
    own batcher and, when live, the observer of its predictions."""

    def __init__(self, runtime: ClassifierRuntime, batcher: AdaptiveBatcher, predictions=None):
        self.runtime = runtime
        self.batcher = batcher
        self.predictions = predictions
        #: Requests holding a lease on this version (changed under ``ModelSet``'s lock).
        self.in_flight = 0

    @property
    def card(self) -> ClassifierRuntime:
        return self.runtime

    @property
    def version(self) -> int:
        return self.runtime.version

    async def classify(self, images: np.ndarray) -> Answers:
        return await self.batcher.submit(images)

    def close(self) -> None:
        self.batcher.close_threadsafe()
        if self.predictions is not None:
            self.predictions.retire()


class ShadowCopies:
    """Copies of live requests for the shadow version: offered on the event loop (one random
    draw and a deque append), compared on the shadow's own thread."""

    def __init__(
        self,
        shadow: ServedVersion,
        live: ServedVersion,
        fraction: float,
        observer: ShadowObserver,
        *,
        max_pending_images: int,
        drift_interval_s: float,
        nice: int = 10,
    ) -> None:
        self.served = shadow
        self.live_version = live.version
        self.fraction = fraction
        self.observer = observer
        #: The same preprocessing: the live request's decoded images serve the shadow too.
        self.same_input = shadow.card.spec == live.card.spec
        self.max_pending_images = max_pending_images
        self.drift_interval_s = drift_interval_s
        self._queue: deque = deque()
        self._pending = 0
        self._scheduled = False
        self._closed = False
        self._lock = threading.Lock()
        self._last_drift = 0.0
        #: How long the shadow's thread lets copies gather before a batch.
        self.collect_s = 0.02
        self._executor = ThreadPoolExecutor(
            1, thread_name_prefix="shadow", initializer=lower_priority, initargs=(nice,)
        )

    @property
    def version(self) -> int:
        return self.served.version

    def offer(self, images: np.ndarray | None, blobs: list[bytes] | None, live: np.ndarray) -> None:
        """A live request's inputs and answers; the shadow takes ``fraction`` of them."""
        if self.fraction < 1 and random.random() >= self.fraction:
            return
        count = len(live)
        payload = images if self.same_input else blobs
        if payload is None:
            self.observer.counted("skipped", count)
            return
        with self._lock:
            if self._closed or self._pending + count > self.max_pending_images:
                self.observer.counted("dropped", count)
                return
            self._pending += count
            self._queue.append((payload, live))
            if self._scheduled:
                return
            self._scheduled = True
        self._executor.submit(self._drain)

    def _drain(self) -> None:
        buckets = self.served.runtime.buckets
        while True:
            if self._pending < buckets[-1]:
                # Nobody waits for the shadow: let copies gather into larger batches, fewer
                # calls (each holds the GIL a little, which the live event loop shares).
                time.sleep(self.collect_s)
            with self._lock:
                # Whole requests up to the largest batch size that needs no padding.
                target = max((b for b in buckets if b <= self._pending), default=buckets[0])
                taken, size = [], 0
                while self._queue and (not taken or size + len(self._queue[0][1]) <= target):
                    item = self._queue.popleft()
                    taken.append(item)
                    size += len(item[1])
                if not taken:
                    self._scheduled = False
                    return
            try:
                self._compare(taken)
            except Exception:
                log.exception("shadow version %d failed on %d images", self.version, size)
                self.observer.counted("failed", size)
            finally:
                with self._lock:
                    self._pending -= size

    def _compare(self, taken: list) -> None:
        if self.same_input:
            images = np.concatenate([payload for payload, _ in taken])
        else:
            card = self.served.card
            images = np.stack([card.preprocess(blob) for payload, _ in taken for blob in payload])
        live = np.concatenate([answers for _, answers in taken])
        started = time.perf_counter()
        shadow = self.served.runtime.predict(images)
        self.observer.compared(images, live, shadow, time.perf_counter() - started)
        if time.monotonic() - self._last_drift >= self.drift_interval_s:
            self._last_drift = time.monotonic()
            self.observer.compute_drift()

    def describe(self) -> dict:
        return {
            "version": self.version,
            "fraction": self.fraction,
            "compared_against": self.live_version,
            "same_input": self.same_input,
            "pending_images": self._pending,
            "max_pending_images": self.max_pending_images,
            **self.observer.summary(),
        }

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._queue.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)


def lower_priority(nice: int) -> None:
    """Run the calling thread at ``nice`` (Linux schedules threads one by one): on a busy
    machine the shadow gets the CPU the live requests leave, falls behind and drops copies,
    rather than taking CPU from them. ONNX Runtime runs a one-thread session on the calling
    thread, so its inference is lowered too."""
    if nice <= 0:
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError) as error:  # not Linux, or not allowed
        log.warning("could not lower the shadow thread's priority: %s", error)


class Lease:
    """A request's hold on one version: ``with model_set.lease() as served: ...``."""

    __slots__ = ("_lock", "served")

    def __init__(self, served: ServedVersion, lock: threading.Lock) -> None:
        self.served = served
        self._lock = lock

    def __enter__(self) -> ServedVersion:
        return self.served

    def __exit__(self, *exc) -> None:
        with self._lock:
            self.served.in_flight -= 1


class ModelSet:
    """The live version and the shadow of one worker, kept in line with the repository's
    roles by a watcher thread (only when serving ``repository/<name>``; a single version
    folder or a BentoML store model is served as it is)."""

    def __init__(
        self,
        source: Path,
        *,
        load: Callable[[Path], ClassifierRuntime],
        serve: Callable[[ClassifierRuntime], ServedVersion],
        shadow_observer: Callable[[ClassifierRuntime], ShadowObserver],
        poll_s: float,
        max_pending_shadow_images: int,
        drift_interval_s: float,
        retire_after_s: float,
        shadow_nice: int = 10,
        observer: VersionObserver | None = None,
    ) -> None:
        self.root = Path(source) if is_model_root(source) else None
        self._load_runtime = load
        self._serve = serve
        self._shadow_observer = shadow_observer
        self.poll_s = poll_s
        self.max_pending_shadow_images = max_pending_shadow_images
        self.drift_interval_s = drift_interval_s
        self.retire_after_s = retire_after_s
        self.shadow_nice = shadow_nice
        self.observer = observer
        self._lock = threading.Lock()
        #: Versions refused, with why and the metadata.json stat they were refused at (a
        #: version published again is tried again).
        self.refused: dict[int, tuple[str, tuple]] = {}
        self.shadow: ShadowCopies | None = None
        self.following = "fixed"
        self.state_error: str | None = None
        self._signature = None
        self._stop = threading.Event()
        self.live = self._serve(self._first_runtime(source))
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
            return self._load_runtime(source)
        self._signature = state_signature(self.root)
        state = self._read_state()
        self.following = "newest" if state.follows_newest else "pinned"
        return load_live(self.root, state, self._load_runtime, self._refuse)

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
        retry = self._forget_republished()
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
            runtime = self._load_runtime(self.root / str(version))
            check_same_classes(version, runtime.classes, self.live.version, self.live.card.classes)
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
        served = self._serve(runtime)
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
        self._retire(old)
        self._report()

    def _set_shadow(self, runtime: ClassifierRuntime | None, fraction: float = 1.0) -> None:
        old = self.shadow
        new = None
        if runtime is not None:
            new = ShadowCopies(
                self._serve_shadow(runtime),
                self.live,
                fraction,
                self._shadow_observer(runtime),
                max_pending_images=self.max_pending_shadow_images,
                drift_interval_s=self.drift_interval_s,
                nice=self.shadow_nice,
            )
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
            self._retire(old.served)
        self._report()

    def _serve_shadow(self, runtime: ClassifierRuntime) -> ServedVersion:
        """The shadow answers ``/v2/models/{name}/versions/{v}/infer`` too, on its own
        batcher, without the live version's prediction metrics."""
        live_batcher = self.live.batcher
        return ServedVersion(
            runtime,
            AdaptiveBatcher(
                runtime.predict,
                max_batch_size=runtime.max_batch_size,
                max_wait_s=live_batcher.max_wait_s,
                max_latency_s=live_batcher.max_latency_s,
                max_queue_size=live_batcher.max_queue_size,
            ),
        )

    def _retire(self, old: ServedVersion) -> None:
        """Close ``old`` once its leases are returned (or after ``retire_after_s``), then
        free its sessions' memory."""

        def wait_then_close(retiring: list[ServedVersion]) -> None:
            served = retiring.pop()  # the last reference but this frame's
            deadline = time.monotonic() + self.retire_after_s
            while served.in_flight > 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            if served.in_flight > 0:
                log.warning(
                    "version %d still had %d request(s) after %.0f s; closing it",
                    served.version,
                    served.in_flight,
                    self.retire_after_s,
                )
            served.close()
            runtime = weakref.ref(served.runtime)
            del served
            # The batcher closes on the event loop: the sessions go once it has.
            deadline = time.monotonic() + self.retire_after_s
            while runtime() is not None and time.monotonic() < deadline:
                time.sleep(0.1)
                gc.collect()
            release_freed_memory()

        threading.Thread(target=wait_then_close, args=([old],), name="retire", daemon=True).start()

    def _refuse(self, version: int, reason: str) -> None:
        log.error(
            "version %d refused: %s; version %s keeps serving",
            version,
            reason,
            getattr(getattr(self, "live", None), "version", "none yet"),
        )
        self.refused[version] = (reason, self._stamp(version))
        if self.observer is not None:
            self.observer.refused(version)

    def _forget_republished(self) -> bool:
        """Forget refusals of versions whose files changed since (fixed, or published
        again): True when there is one to try again."""
        changed = [v for v, (_, stamp) in self.refused.items() if self._stamp(v) != stamp]
        for version in changed:
            del self.refused[version]
            if self.observer is not None:
                self.observer.forgiven(version)
        return bool(changed)

    def _stamp(self, version: int) -> tuple:
        """Every file of ``version`` (name, size, time, inode): a refused version whose
        files change, a side file restored as much as ``model.onnx``, is tried again."""
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
            "refused": {
                str(v): relative(reason) for v, (reason, _) in sorted(self.refused.items())
            },
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
