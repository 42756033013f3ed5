"""Training-time augmentation as Keras preprocessing layers, mapped over tf.data batches.

Rotation, translation, zoom and horizontal flip are one ``RandomAffine`` layer: the four
transforms are composed into one matrix per image and applied in a single resampling pass.
Keras' separate RandomRotation/RandomTranslation/RandomZoom layers resample the batch three
times (three interpolations' worth of blur) and were 2.5x slower here (see the README's
input-pipeline benchmark). Brightness and contrast use Keras' own layers.
"""

from __future__ import annotations

import math

import keras
from keras import layers, ops

from training.config import AugmentationConfig


@keras.saving.register_keras_serializable(package="imgclf")
class RandomAffine(layers.Layer):
    """Random rotation (degrees), shifts (fractions of width/height), zoom (fraction) and
    horizontal flip, composed per image and applied in one ``affine_transform``."""

    def __init__(
        self,
        rotation_degrees: float = 20.0,
        width_shift: float = 0.2,
        height_shift: float = 0.2,
        zoom: float = 0.2,
        horizontal_flip: bool = True,
        fill_mode: str = "nearest",
        interpolation: str = "bilinear",
        seed: int | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.rotation_degrees = rotation_degrees
        self.width_shift = width_shift
        self.height_shift = height_shift
        self.zoom = zoom
        self.horizontal_flip = horizontal_flip
        self.fill_mode = fill_mode
        self.interpolation = interpolation
        self.seed = seed
        self.generator = keras.random.SeedGenerator(seed)
        self.supports_masking = False

    def call(self, images, training: bool = True):
        if not training:
            return images
        shape = ops.shape(images)
        batch, height, width = (
            shape[0],
            ops.cast(shape[1], "float32"),
            ops.cast(shape[2], "float32"),
        )

        def uniform(limit: float):
            return keras.random.uniform((batch,), -limit, limit, seed=self.generator)

        angle = uniform(math.radians(self.rotation_degrees))
        scale = 1.0 + uniform(self.zoom)  # > 1 samples a larger area: zoom out
        flip = ops.ones((batch,))
        if self.horizontal_flip:
            coin = keras.random.uniform((batch,), 0.0, 1.0, seed=self.generator)
            flip = ops.where(coin < 0.5, -1.0, 1.0)
        shift_x = uniform(self.width_shift) * width
        shift_y = uniform(self.height_shift) * height

        # Output pixel p samples input pixel c + R(angle) @ diag(scale*flip, scale) @ (p - c) + t.
        cos, sin = ops.cos(angle), ops.sin(angle)
        a0, a1 = cos * scale * flip, -sin * scale
        b0, b1 = sin * scale * flip, cos * scale
        center_x, center_y = (width - 1.0) / 2.0, (height - 1.0) / 2.0
        a2 = center_x - a0 * center_x - a1 * center_y + shift_x
        b2 = center_y - b0 * center_x - b1 * center_y + shift_y
        zeros = ops.zeros((batch,))
        transform = ops.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
        return ops.image.affine_transform(
            images, transform, interpolation=self.interpolation, fill_mode=self.fill_mode
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "rotation_degrees": self.rotation_degrees,
            "width_shift": self.width_shift,
            "height_shift": self.height_shift,
            "zoom": self.zoom,
            "horizontal_flip": self.horizontal_flip,
            "fill_mode": self.fill_mode,
            "interpolation": self.interpolation,
            "seed": self.seed,
        }


def build_augmentation(
    config: AugmentationConfig, *, seed: int, value_range: tuple[float, float] = (0.0, 255.0)
) -> keras.Sequential | None:
    """The configured random transforms, or None when every one is switched off."""
    stack = []
    geometric = (config.rotation_degrees, config.width_shift, config.height_shift, config.zoom)
    if config.horizontal_flip or any(value > 0 for value in geometric):
        stack.append(
            RandomAffine(
                rotation_degrees=config.rotation_degrees,
                width_shift=config.width_shift,
                height_shift=config.height_shift,
                zoom=config.zoom,
                horizontal_flip=config.horizontal_flip,
                fill_mode=config.fill_mode,
                seed=seed,
                name="random_affine",
            )
        )
    if config.brightness > 0:
        stack.append(
            layers.RandomBrightness(config.brightness, value_range=value_range, seed=seed + 1)
        )
    if config.contrast > 0:
        stack.append(layers.RandomContrast(config.contrast, value_range=value_range, seed=seed + 2))
    return keras.Sequential(stack, name="augmentation") if stack else None
