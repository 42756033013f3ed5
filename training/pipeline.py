"""The tf.data input pipeline: parallel shared decoding, cache, shuffle, batch, augment, prefetch.

Images are decoded by ``serving.core.preprocessing`` (inside ``tf.numpy_function``) so that training
sees exactly the tensors serving will. Augmentation (``training.augmentation``) is mapped over
training batches only; it never becomes part of the model.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from serving.core.preprocessing import PreprocessSpec, preprocess_file
from training.config import DataConfig
from training.datasets import Sample

AUTOTUNE = tf.data.AUTOTUNE


def preprocess_spec(config: DataConfig) -> PreprocessSpec:
    height, width = config.image_size
    return PreprocessSpec(
        height=height, width=width, channels=config.channels, resize_filter=config.resize_filter
    )


def make_dataset(
    samples: list[Sample],
    classes: list[str],
    spec: PreprocessSpec,
    *,
    batch_size: int,
    training: bool,
    augmentation=None,
    cache: str = "auto",
    cache_limit_bytes: int = 2 * 1024**3,
    seed: int = 0,
) -> tf.data.Dataset:
    """(image batch float32 [0, 255], one-hot label batch) pairs for ``fit`` and ``evaluate``."""
    index = {name: i for i, name in enumerate(classes)}
    paths = np.array([str(s.path) for s in samples])
    labels = np.array([index[s.label] for s in samples], dtype=np.int32)
    shape = spec.input_shape

    def load(path: tf.Tensor) -> tf.Tensor:
        image = tf.numpy_function(
            lambda p: preprocess_file(p.decode(), spec), [path], tf.float32, stateful=False
        )
        image.set_shape(shape)
        return image

    dataset = tf.data.Dataset.from_tensor_slices((paths, labels))
    dataset = dataset.map(
        lambda path, label: (load(path), tf.one_hot(label, len(classes))),
        num_parallel_calls=AUTOTUNE,
        deterministic=True,
    )
    decoded_bytes = len(samples) * int(np.prod(shape)) * 4
    if cache == "memory" or (cache == "auto" and decoded_bytes <= cache_limit_bytes):
        dataset = dataset.cache()
    if training:
        dataset = dataset.shuffle(len(samples), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size)
    if training and augmentation is not None:
        dataset = dataset.map(
            lambda images, onehot: (augmentation(images, training=True), onehot),
            num_parallel_calls=AUTOTUNE,
        )
    options = tf.data.Options()
    # Parallelism across batches, not inside each op: on few cores the two oversubscribe.
    options.threading.max_intra_op_parallelism = 1
    return dataset.prefetch(AUTOTUNE).with_options(options)
