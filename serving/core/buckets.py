"""Batch shapes: the few batch sizes ONNX Runtime is ever called with.

Every batch is zero-padded up to the next bucket, so a session sees a handful of shapes that
can all be warmed up (and, on CUDA, one session per shape: see ``serving.core.runtime``).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

import numpy as np

from serving.core.errors import ConfigError


def power_of_two_buckets(max_batch_size: int) -> tuple[int, ...]:
    """1, 2, 4, ... below ``max_batch_size``, then ``max_batch_size``: at most half of a
    padded batch is padding, and log2(max) + 1 shapes to warm."""
    sizes = []
    size = 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return (*sizes, max_batch_size)


def normalise_buckets(buckets: Iterable[int] | None, max_batch_size: int) -> tuple[int, ...]:
    """``buckets`` sorted and unique, checked to be positive and to end at
    ``max_batch_size``; power-of-two buckets when None."""
    if buckets is None:
        return power_of_two_buckets(max_batch_size)
    found = tuple(sorted(set(buckets)))
    if not found or found[0] < 1 or found[-1] != max_batch_size:
        raise ConfigError(
            f"batch buckets must be positive and end at max_batch_size ({max_batch_size}), "
            f"got {list(found)}"
        )
    return found


def bucket_for(size: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds ``size`` images."""
    index = bisect.bisect_left(buckets, size)
    if index == len(buckets):
        raise ValueError(f"a batch of {size} exceeds the largest bucket {buckets[-1]}")
    return buckets[index]


def pad_to_bucket(images: np.ndarray, buckets: tuple[int, ...]) -> np.ndarray:
    """``images`` with zero rows appended up to the smallest bucket that holds them."""
    missing = bucket_for(len(images), buckets) - len(images)
    if missing == 0:
        return images
    return np.concatenate([images, np.zeros((missing, *images.shape[1:]), images.dtype)])
