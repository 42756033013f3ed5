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


def _real_photos() -> list:
    """The two real photographs scikit-learn ships (427x640), as Pillow images."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(array) for array in load_sample_images().images]


def _crop(photo, rng, width: int, height: int):
    """A ``width`` x ``height`` crop of ``photo`` at a random place."""
    left = int(rng.integers(0, photo.width - width + 1))
    top = int(rng.integers(0, photo.height - height + 1))
    return photo.crop((left, top, left + width, top + height))


def encode(image, fmt: str, **options) -> bytes:
    """``image`` as the bytes of a ``fmt`` file (Pillow's format name), as an upload."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def photo_jpegs(count: int, smallest: int = 160, largest: int = 420, seed: int = 0) -> list:
    """Photo-sized JPEG uploads (longer side ``smallest`` to ``largest`` pixels) cut from the
    two real photographs that scikit-learn ships, at varied crops, sizes and qualities."""
    import numpy as np
    from PIL import Image

    photos, rng = _real_photos(), np.random.default_rng(seed)
    jpegs = []
    for index in range(count):
        photo = photos[index % len(photos)]
        crop_w = int(rng.integers(photo.width // 3, photo.width + 1))
        crop_h = int(rng.integers(photo.height // 3, photo.height + 1))
        crop = _crop(photo, rng, crop_w, crop_h)
        side = int(rng.integers(smallest, largest + 1))
        scale = side / max(crop.size)
        resized = crop.resize(
            (max(1, round(crop_w * scale)), max(1, round(crop_h * scale))), Image.BILINEAR
        )
        jpegs.append(encode(resized, "JPEG", quality=int(rng.integers(80, 95))))
    return jpegs


def phone_photos(count: int, seed: int = 0) -> list[bytes]:
    """Phone-camera JPEGs: 12-megapixel class (longer side 3,000 to 4,032 pixels, 4:3),
    quality 88 to 95, made from the two real photographs scikit-learn ships (cropped and
    upscaled, with a little sensor-like noise so that they compress like camera files, 1 to
    3 MB); every third one stored sideways with EXIF orientation 6, as phones write them."""
    import numpy as np
    from PIL import Image

    photos, rng = _real_photos(), np.random.default_rng(seed)
    jpegs = []
    for index in range(count):
        photo = photos[index % len(photos)]
        crop_h = int(rng.integers(photo.height * 2 // 3, photo.height + 1))
        crop = _crop(photo, rng, min(photo.width, crop_h * 4 // 3), crop_h)
        side = int(rng.integers(3000, 4033))
        size = (side, side * 3 // 4)
        upscaled = crop.resize(size, Image.BICUBIC)
        noisy = np.asarray(upscaled, dtype=np.int16) + rng.normal(0, 3, (size[1], size[0], 3))
        image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        exif = Image.Exif()
        if index % 3 == 2:
            image = image.transpose(Image.Transpose.ROTATE_90)  # stored sideways,
            exif[0x0112] = 6  # and tagged to be turned upright
        jpegs.append(encode(image, "JPEG", quality=int(rng.integers(88, 96)), exif=exif))
    return jpegs


def contract_copy(model_dir, target, jpeg_draft_margin: float | None):
    """A copy of a published model whose preprocessing contract differs in the JPEG draft
    step only (None: full-size decoding, the contract of models exported before the step),
    for before/after comparisons on the same ONNX graph in one run."""
    import json
    import shutil
    from pathlib import Path

    from serving.core.preprocessing import PreprocessSpec

    target = Path(target)
    shutil.copytree(model_dir, target)
    metadata = json.loads((target / "metadata.json").read_text())
    spec = PreprocessSpec.from_metadata(
        {**metadata["preprocessing"], "jpeg_draft_margin": jpeg_draft_margin}
    )
    metadata["preprocessing"] = {**metadata["preprocessing"], **spec.describe()}
    (target / "metadata.json").write_text(json.dumps(metadata, indent=2))
    return target
