"""JPEG draft decoding: time, pixels and accuracy for each margin, against full-size decoding.

The preprocessing contract decodes a JPEG at the smallest power-of-two scale (1/8, 1/4, 1/2)
that keeps both sides at least ``margin`` times the model's input, then resizes as before.
This measures what each margin costs and changes, one core, in one run:

- phone photos (``benchmarks.common.phone_photos``: 12-megapixel class, from real photos) to
  224x224 and to 32x32: milliseconds per image, and the mean / max absolute difference of the
  model input from full-size decoding (0-255 scale);
- the digits model on real handwritten digits saved as large JPEGs: top-1 agreement with
  full-size decoding, and accuracy against the true labels.

    .venv/bin/python benchmarks/bench_jpeg_draft.py [--model model_repository/digits]
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import contract_copy, machine, phone_photos, table  # noqa: E402
from serving.core.preprocessing import PreprocessSpec, preprocess_bytes  # noqa: E402
from serving.core.roles import resolve_model_dir  # noqa: E402
from serving.core.runtime import ClassifierRuntime  # noqa: E402
from training.datasets import discover, write_digits  # noqa: E402

MARGINS = (None, 1.0, 2.0, 4.0)


def shown(margin: float | None) -> str:
    return "full size (contract 1)" if margin is None else f"draft, margin {margin:g}"


def photo_rows(photos: list[bytes], size: int, repeats: int) -> list[list]:
    rows, reference = [], None
    for margin in MARGINS:
        spec = PreprocessSpec(size, size, jpeg_draft_margin=margin)
        arrays = [preprocess_bytes(photo, spec) for photo in photos]
        started = time.perf_counter()
        for _ in range(repeats):
            for photo in photos:
                preprocess_bytes(photo, spec)
        ms = (time.perf_counter() - started) * 1000 / (repeats * len(photos))
        if reference is None:
            reference, speedup, mean, most = arrays, ms, 0.0, 0.0
        differences = [np.abs(a - r) for a, r in zip(arrays, reference, strict=True)]
        mean = float(np.mean([d.mean() for d in differences]))
        most = float(max(d.max() for d in differences))
        rows.append([f"{size}x{size}", shown(margin), ms, f"{speedup / ms:.1f}x", mean, most])
    return rows


def digit_jpegs(count: int, side: int) -> tuple[list[bytes], list[str]]:
    samples = discover(write_digits()).samples
    step = max(1, len(samples) // count)
    jpegs, labels = [], []
    for sample in samples[::step][:count]:
        with Image.open(sample.path) as image:
            buffer = io.BytesIO()
            image.convert("RGB").resize((side, side), Image.BICUBIC).save(
                buffer, "JPEG", quality=90
            )
        jpegs.append(buffer.getvalue())
        labels.append(sample.label)
    return jpegs, labels


def accuracy_rows(model_dir: Path, jpegs: list[bytes], labels: list[str]) -> list[list]:
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as scratch:
        for index, margin in enumerate(MARGINS):
            copy = contract_copy(model_dir, Path(scratch) / str(index), margin)
            runtime = ClassifierRuntime(copy, provider="cpu", max_batch_size=64)
            predicted = []
            for start in range(0, len(jpegs), 64):
                batch = np.stack([runtime.preprocess(j) for j in jpegs[start : start + 64]])
                predicted += [runtime.classes[i] for i in runtime.predict(batch).argmax(axis=1)]
            if reference is None:
                reference = predicted
            agree = np.mean([p == r for p, r in zip(predicted, reference, strict=True)])
            correct = np.mean([p == t for p, t in zip(predicted, labels, strict=True)])
            rows.append([shown(margin), len(jpegs), f"{agree:.4f}", f"{correct:.4f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "model_repository" / "digits")
    parser.add_argument("--photos", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--digits", type=int, default=600)
    parser.add_argument("--digit-side", type=int, default=1024)
    args = parser.parse_args()
    model_dir = resolve_model_dir(args.model).resolve()

    photos = phone_photos(args.photos)
    megabytes = sum(map(len, photos)) / len(photos) / 2**20
    rows = photo_rows(photos, 224, args.repeats) + photo_rows(photos, 32, args.repeats)
    jpegs, labels = digit_jpegs(args.digits, args.digit_side)
    accuracy = accuracy_rows(model_dir, jpegs, labels)

    print(f"machine: {machine()}; one core (decoding is single-threaded per image)")
    print(f"{len(photos)} phone photos, {megabytes:.1f} MB on average\n")
    print(
        table(
            ["model input", "decoding", "ms per image", "speed-up", "mean |diff|", "max |diff|"],
            rows,
        )
    )
    print(
        f"\nmodel: {model_dir}; real digits as {args.digit_side}x{args.digit_side} JPEGs "
        "(quality 90)\n"
    )
    print(table(["decoding", "images", "top-1 agrees with full size", "accuracy"], accuracy))


if __name__ == "__main__":
    main()
