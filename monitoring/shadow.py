"""The evidence for a shadow version, gathered in each worker from the copies of live
requests it answers: how often it agrees with the live version, how confident each is, and
the drift of the shadow's answers against its own reference profile (what an operator weighs
before promoting it: docs/releasing.md). Its own module because it watches a version that
answers no caller, on the shadow's own thread."""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from monitoring import metrics
from monitoring.buffer import BUFFER
from monitoring.drift import DriftMonitor, image_signals


class ShadowObserver:
    """The evidence for one shadow version against the live one: counters over its whole
    life (fleet-wide by summing), and this worker's window of the last ``window`` compared
    images (agreement, mean confidence of each, drift of the shadow's answers against its
    own reference profile). Called from the shadow's thread: the window keeps running sums
    (O(1) per image), and the gauges are written at most once a second."""

    def __init__(
        self, version: int, profile: dict | None, *, window: int, min_samples: int, mode: str
    ) -> None:
        label = str(version)
        self._outcomes = {
            outcome: metrics.SHADOW_IMAGES.labels(label, outcome)
            for outcome in ("compared", "dropped", "failed", "skipped")
        }
        self._agreements = metrics.SHADOW_AGREEMENTS.labels(label)
        self.window = window
        #: (agreed, live confidence, shadow confidence) per compared image, and their sums.
        self._recent: deque[tuple[bool, float, float]] = deque()
        self._agreed, self._confidence_live, self._confidence_shadow = 0, 0.0, 0.0
        self.totals = dict.fromkeys(self._outcomes, 0) | {"agreed": 0}
        self.monitor = (
            DriftMonitor(profile, window=window, min_samples=min_samples, mode=mode)
            if profile is not None
            else None
        )
        self.drift: dict | None = None
        self._published = 0.0

    def counted(self, outcome: str, images: int) -> None:
        BUFFER.inc(self._outcomes[outcome], images)
        self.totals[outcome] += images

    def compared(
        self, images: np.ndarray, live: np.ndarray, shadow: np.ndarray, seconds: float
    ) -> None:
        agree = live.argmax(axis=1) == shadow.argmax(axis=1)
        agreed = int(agree.sum())
        self.counted("compared", len(agree))
        self.totals["agreed"] += agreed
        BUFFER.inc(self._agreements, agreed)
        BUFFER.observe(metrics.SHADOW_DURATION, seconds)
        rows = zip(
            agree.tolist(), live.max(axis=1).tolist(), shadow.max(axis=1).tolist(), strict=True
        )
        for row in rows:
            self._recent.append(row)
            self._agreed += row[0]
            self._confidence_live += row[1]
            self._confidence_shadow += row[2]
        while len(self._recent) > self.window:
            gone = self._recent.popleft()
            self._agreed -= gone[0]
            self._confidence_live -= gone[1]
            self._confidence_shadow -= gone[2]
        if self.monitor is not None:
            self.monitor.add(image_signals(images, shadow))
        if time.monotonic() - self._published >= 1.0:
            self.publish()

    def publish(self) -> None:
        """The window's figures as gauges."""
        self._published = time.monotonic()
        summary = self.summary()
        if summary["window_samples"]:
            metrics.SHADOW_WINDOW.set(summary["window_samples"])
            metrics.SHADOW_AGREEMENT.set(summary["agreement"])
            for role in ("live", "shadow"):
                metrics.SHADOW_MEAN_CONFIDENCE.labels(role).set(summary["mean_confidence"][role])

    def compute_drift(self) -> None:
        if self.monitor is None:
            return
        report = self.monitor.compute()
        if report is None:
            return
        self.drift = {
            "status": report["status"],
            "signals": {
                name: {"psi": values["psi"], "level": values["level"]}
                for name, values in report["signals"].items()
            },
        }
        for signal, values in report["signals"].items():
            metrics.SHADOW_DRIFT_PSI.labels(signal).set(values["psi"])

    def summary(self) -> dict:
        samples = len(self._recent)
        agreed, live, shadow = self._agreed, self._confidence_live, self._confidence_shadow
        return {
            "window_samples": samples,
            "agreement": agreed / samples if samples else None,
            "mean_confidence": {
                "live": live / samples if samples else None,
                "shadow": shadow / samples if samples else None,
            },
            "totals": dict(self.totals),
            "drift": self.drift,
        }
