"""Keep TensorFlow's and absl's native start-up lines away from the user.

TensorFlow 2.21 prints ``WARNING: All log messages before absl::InitializeLog() ...`` and
``I0000 ... port.cc:153] oneDNN custom operations are on ...`` from C++ straight to file
descriptor 2, whatever ``TF_CPP_MIN_LOG_LEVEL`` says. ``native_log_filter`` routes fd 2
through a pipe and drops those lines (absl's ``[IWEF]MMDD hh:mm:ss`` format and the
InitializeLog notice); everything else, our log lines and errors included, passes through
unchanged. ``imgclf --verbose`` turns the filter off.
"""

from __future__ import annotations

import os
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: Lines of native logging we hide: absl's prefix (severity, date, time), and the notice.
NOISE = re.compile(
    rb"^([IW]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\]"  # absl: I0000 00:00:1795.. 5482 port.cc:153]
    rb"|WARNING: All log messages before absl"
    rb"|To enable the following instructions: )"  # cpu_feature_guard's second line
)


@contextmanager
def native_log_filter(noise: re.Pattern[bytes] = NOISE) -> Iterator[None]:
    """While active, drop the lines ``noise`` matches (by default native informational log
    lines) from standard error, at the file descriptor: C++ writes there, not through
    ``sys.stderr``. Ray's batch engine drops one notice of Ray's core worker with it."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no real file descriptor 2 (embedded, some test runners)
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    pump = threading.Thread(target=_forward, args=(read_end, saved, noise), daemon=True)
    pump.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the pump sees end of file
        pump.join(timeout=5)
        os.close(saved)


def _forward(read_end: int, target: int, noise: re.Pattern[bytes]) -> None:
    pending = b""
    with os.fdopen(read_end, "rb", buffering=0) as source:
        while chunk := source.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if not noise.match(line):
                    os.write(target, line + b"\n")
            # A partial line that cannot be noise (a progress bar redrawn with \r) goes on now.
            if pending and not noise.match(pending) and not _could_become_noise(pending, noise):
                os.write(target, pending)
                pending = b""
    if pending and not noise.match(pending):
        os.write(target, pending)


def _could_become_noise(partial: bytes, noise: re.Pattern[bytes]) -> bool:
    """Whether more bytes could still make ``partial`` a line that ``noise`` matches (for
    another pattern than ours, a partial line waits for its end, up to 4 KiB)."""
    if noise is not NOISE:
        return len(partial) < 4096
    return len(partial) < 40 and (partial[:1] in (b"I", b"W"))
