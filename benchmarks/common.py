"""Helpers every benchmark uses: the machine description and a plain-text table."""

from __future__ import annotations

import os
import platform
import time


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import psutil

        memory = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        memory = ""
    return f"{cpu}, {os.cpu_count()} cores{memory}, Python {platform.python_version()}"


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"
        for row in cells
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def mixed_batch_sizes(count: int, largest: int, seed: int = 0) -> list[int]:
    """Batch sizes as a loaded adaptive batcher hands them over: a different one almost every
    call, spread evenly over the power-of-two buckets (log-uniform from 1 to ``largest``).
    A loop over one shape never sees what a shape change costs (on CUDA, ~0.5 s)."""
    import numpy as np

    draws = np.random.default_rng(seed).uniform(0, np.log2(largest), count)
    return [int(size) for size in np.rint(2**draws)]


def time_mixed(predict, images, sizes: list[int], seconds: float) -> dict:
    """Call ``predict`` on batches of ``sizes`` (cycled) for up to ``seconds``: images/s and
    milliseconds per call (p50, p99)."""
    import numpy as np

    latencies, done, index = [], 0, 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(latencies) < min(len(sizes), 8):
        size = sizes[index % len(sizes)]
        begin = time.perf_counter()
        predict(images[np.arange(index, index + size) % len(images)])
        latencies.append(time.perf_counter() - begin)
        done += size
        index += 1
    elapsed = time.perf_counter() - started
    return {
        "images_per_s": done / elapsed,
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
        "calls": len(latencies),
    }


def photo_jpegs(count: int, smallest: int = 160, largest: int = 420, seed: int = 0) -> list:
    """Photo-sized JPEG uploads (longer side ``smallest`` to ``largest`` pixels) cut from the
    two real photographs that scikit-learn ships, at varied crops, sizes and qualities."""
    import io

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(array) for array in load_sample_images().images]
    rng = np.random.default_rng(seed)
    jpegs = []
    for index in range(count):
        photo = photos[index % len(photos)]
        width, height = photo.size
        crop_w = int(rng.integers(width // 3, width + 1))
        crop_h = int(rng.integers(height // 3, height + 1))
        left = int(rng.integers(0, width - crop_w + 1))
        top = int(rng.integers(0, height - crop_h + 1))
        crop = photo.crop((left, top, left + crop_w, top + crop_h))
        side = int(rng.integers(smallest, largest + 1))
        scale = side / max(crop.size)
        resized = crop.resize(
            (max(1, round(crop_w * scale)), max(1, round(crop_h * scale))), Image.BILINEAR
        )
        buffer = io.BytesIO()
        resized.save(buffer, "JPEG", quality=int(rng.integers(80, 95)))
        jpegs.append(buffer.getvalue())
    return jpegs
