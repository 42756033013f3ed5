"""How a server shares out the machine when its settings leave it open: worker processes,
decode threads per worker and ONNX Runtime threads per worker, by provider and cores."""

from __future__ import annotations

import os
from dataclasses import dataclass


def default_workers(provider: str, cores: int | None = None) -> int:
    """Worker processes when ``--workers`` is not given.

    CPU: one per core, each with a one-thread ONNX Runtime session, so that decoding, HTTP
    handling and inference of different requests run on every core without oversubscription.
    CUDA: the GPU classifies far faster than the CPU decodes (an H200 ran MobileNetV2@224 at
    10,170 images/s; 16 cores decoded about 1,870 photos/s), so the workers' job is HTTP and
    decoding: one worker per two cores, at most eight, each with a CUDA context (a few
    hundred MB of GPU memory) and its sessions. Fewer workers also keep batches larger.
    """
    cores = cores or os.cpu_count() or 1
    if provider == "cpu":
        return cores
    return max(1, min(8, cores // 2))


def default_decode_threads(provider: str, workers: int, cores: int | None = None) -> int:
    """Decode threads per worker when ``decode_threads`` is not set.

    CPU: 2 (a worker per core already fills the cores; on 2 cores, medians of three
    alternating rounds, 2 threads per worker served 904 small uploads/s against 816 with 4, and
    57.9 phone photos/s against 56.3: more threads only contend). CUDA: the cores shared
    out among the workers, at least 2, so that decoding, the GPU host's bottleneck, can use
    every core.
    """
    cores = cores or os.cpu_count() or 1
    if provider == "cpu":
        return 2
    return max(2, cores // max(1, workers))


def default_batch_decode_bytes(provider: str) -> int:
    """Largest image (bytes) that a request of one image has decoded by its batch's
    inference thread when ``batch_decode_bytes`` is not set.

    CPU: 64 KiB (a thumbnail; a phone photo takes milliseconds and goes to the decode
    threads, so that it holds up no batch). Each worker's ONNX Runtime runs one thread per
    core it has, so decoding there takes no parallelism away, and it saves the hop to a
    decode thread and back: on 2 cores, 10 % more digit uploads a second (medians of four
    alternating rounds, 2,758 against 2,494). CUDA: 0, since the inference thread's job is
    to keep the GPU fed, and decoding is what the host's cores are there for.
    """
    return 64 * 1024 if provider == "cpu" else 0


def default_ort_threads(workers: int, cores: int | None = None) -> int:
    """ONNX Runtime's intra-op threads per worker when ``intra_op_threads`` is not set: the
    cores shared out among the workers (on the CPU, one each: the workers are the
    parallelism)."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // workers)


@dataclass(frozen=True)
class Sizing:
    """How a server shares out the machine: what its settings say, else the defaults above
    for its provider."""

    workers: int
    #: Per worker.
    decode_threads: int
    batch_decode_bytes: int
    ort_threads: int


def sizing_for(settings, provider: str) -> Sizing:
    """``settings``' sizing (a ``ServingSettings``), defaults filled in for ``provider``."""
    workers = settings.workers or default_workers(provider)
    return Sizing(
        workers=workers,
        decode_threads=settings.decode_threads or default_decode_threads(provider, workers),
        batch_decode_bytes=default_batch_decode_bytes(provider)
        if settings.batch_decode_bytes is None
        else settings.batch_decode_bytes,
        ort_threads=settings.intra_op_threads or default_ort_threads(workers),
    )
