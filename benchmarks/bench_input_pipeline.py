"""Training input throughput: our tf.data pipeline vs Keras' legacy ImageDataGenerator.flow.

Both produce augmented float32 batches of the built-in digits at the same size with the same
classic augmentation (rotation 20, shifts 0.2, zoom 0.2, horizontal flip, nearest fill), in one
run, alternating rounds so that machine noise hits both. Run by hand:

    .venv/bin/python benchmarks/bench_input_pipeline.py [--size 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import tensorflow as tf

from benchmarks.common import Timer, machine, table
from serving.core.preprocessing import PreprocessSpec, preprocess_file
from training import datasets
from training.augmentation import build_augmentation
from training.config import AugmentationConfig
from training.pipeline import make_dataset


def images_per_second(batches, count: int) -> float:
    seen = 0
    with Timer() as timer:
        for images, _ in batches:
            seen += len(images)
            if seen >= count:
                break
    return seen / timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    folder = datasets.discover(datasets.write_digits())
    spec = PreprocessSpec(args.size, args.size)
    classes = folder.classes
    augmentation_config = AugmentationConfig()  # the classic settings
    augmentation = build_augmentation(augmentation_config, seed=0)
    pipeline = make_dataset(
        folder.samples,
        classes,
        spec,
        batch_size=args.batch_size,
        training=True,
        augmentation=augmentation,
        seed=0,
    )
    with Timer() as first:  # decodes every file once and fills the cache
        for _ in pipeline:
            pass
    n = len(folder.samples)

    images = np.stack([preprocess_file(s.path, spec) for s in folder.samples])
    labels = tf.keras.utils.to_categorical([classes.index(s.label) for s in folder.samples])
    generator = tf.keras.preprocessing.image.ImageDataGenerator(
        rotation_range=augmentation_config.rotation_degrees,
        width_shift_range=augmentation_config.width_shift,
        height_shift_range=augmentation_config.height_shift,
        zoom_range=augmentation_config.zoom,
        horizontal_flip=augmentation_config.horizontal_flip,
        fill_mode=augmentation_config.fill_mode,
    )
    flow = generator.flow(images, labels, batch_size=args.batch_size, shuffle=True, seed=0)

    ours, legacy = [], []
    for _ in range(args.rounds):
        ours.append(images_per_second(pipeline.repeat(), n))
        legacy.append(images_per_second(flow, n))
    ours_median, legacy_median = statistics.median(ours), statistics.median(legacy)
    print(f"machine: {machine()}; TensorFlow {tf.__version__}")
    print(
        f"{n} digits at {args.size}x{args.size}, batch {args.batch_size}, classic augmentation, "
        f"median of {args.rounds} alternating epochs\n"
    )
    print(
        table(
            ["input pipeline", "images/s", "vs ImageDataGenerator"],
            [
                [
                    "tf.data + Keras layers (cached)",
                    ours_median,
                    f"{ours_median / legacy_median:.1f}x",
                ],
                [
                    "tf.data first epoch (decode + cache)",
                    n / first.seconds,
                    f"{n / first.seconds / legacy_median:.1f}x",
                ],
                ["ImageDataGenerator.flow", legacy_median, "1.0x"],
            ],
        )
    )


if __name__ == "__main__":
    main()
