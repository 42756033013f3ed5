"""Real image files for the tests, made from scikit-learn's handwritten digits: every format
and colour mode a class folder may mix. Its own module, because the model cache
(``tests/model_cache.py``) keys the data sets it keeps on this file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

SAVE_FORMATS = [  # (suffix, Pillow format, mode): the formats a class folder may mix
    (".png", "PNG", "L"),
    (".jpg", "JPEG", "RGB"),
    (".png", "PNG", "RGBA"),
    (".bmp", "BMP", "RGB"),
    (".gif", "GIF", "P"),
    (".webp", "WEBP", "RGB"),
]


def digit_images(count_per_class: int, classes: tuple[int, ...] = (0, 1, 2), scale: int = 4):
    """Real 8x8 digit scans, upscaled so JPEG and resize have something to work on."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for label in classes:
        picked = np.flatnonzero(digits.target == label)[:count_per_class]
        for index in picked:
            pixels = np.rint(digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
            image = Image.fromarray(pixels, mode="L").resize((8 * scale, 8 * scale), Image.NEAREST)
            yield str(label), int(index), image


def write_image(image: Image.Image, path: Path, fmt: str, mode: str) -> Path:
    converted = image.convert(mode)
    if mode == "RGBA":  # a real alpha channel: transparent background, opaque ink
        alpha = Image.eval(image.convert("L"), lambda v: 255 if v > 40 else 60)
        converted.putalpha(alpha)
    converted.save(path, format=fmt)
    return path


def make_image_folder(root: Path, count_per_class: int = 12, classes=(0, 1, 2)) -> Path:
    """``root/<digit>/<file>`` with every supported format and colour mode mixed in."""
    for position, (label, index, image) in enumerate(digit_images(count_per_class, classes)):
        suffix, fmt, mode = SAVE_FORMATS[position % len(SAVE_FORMATS)]
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        write_image(image, folder / f"digit_{index:04d}_{mode.lower()}{suffix}", fmt, mode)
    return root


def write_large_photos(folder: Path, count_per_class: int = 80) -> None:
    """Digit photos of 1200x1200 pixels (three classes), JPEG on a noisy background: slow
    enough to decode that a scoring job can be interrupted half-way."""
    # One noise field, shifted per image: drawing 4 million normals per image took most of
    # 50 s.
    noise = np.random.default_rng(0).normal(0, 10, (1200, 1200, 3)).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    for index, (_, _, image) in enumerate(digit_images(count_per_class)):
        photo = np.asarray(image.convert("RGB").resize((1200, 1200)), np.float32)
        shifted = np.roll(noise, 37 * index, axis=(0, 1))
        noisy = np.clip(photo + shifted, 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"photo_{index:04d}.jpg", "JPEG", quality=80)
