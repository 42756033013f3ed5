"""The tf.data loader against the shared preprocessing module, augmentation, and every model."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
import keras  # noqa: E402

from serving.core.preprocessing import PreprocessSpec, preprocess_file  # noqa: E402
from training import datasets  # noqa: E402
from training.augmentation import RandomAffine, build_augmentation  # noqa: E402
from training.config import AugmentationConfig  # noqa: E402
from training.models import BACKBONES, build_model, unfreeze_top  # noqa: E402
from training.pipeline import make_dataset  # noqa: E402


def test_loader_gives_the_same_tensor_as_the_preprocessing_module(image_folder):
    """One preprocessing contract: every file, through tf.data and through serving's module."""
    folder = datasets.discover(image_folder)
    spec = PreprocessSpec(height=28, width=20, resize_filter="bicubic")
    loader = make_dataset(folder.samples, folder.classes, spec, batch_size=5, training=False)
    batches = list(loader.as_numpy_iterator())
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    assert images.shape == (36, 28, 20, 3) and images.dtype == np.float32
    for index, sample in enumerate(folder.samples):
        np.testing.assert_array_equal(images[index], preprocess_file(sample.path, spec))
        assert labels[index].argmax() == folder.classes.index(sample.label)


def test_augmentation_touches_training_batches_only(image_folder):
    folder = datasets.discover(image_folder)
    spec = PreprocessSpec(32, 32)
    augmentation = build_augmentation(AugmentationConfig(), seed=1)
    kwargs = dict(batch_size=36, augmentation=augmentation, seed=3)
    plain = next(
        make_dataset(
            folder.samples, folder.classes, spec, training=False, **kwargs
        ).as_numpy_iterator()
    )[0]
    augmented = next(
        make_dataset(
            folder.samples, folder.classes, spec, training=True, **kwargs
        ).as_numpy_iterator()
    )[0]
    expected = np.stack([preprocess_file(s.path, spec) for s in folder.samples])
    np.testing.assert_array_equal(plain, expected)
    # Shuffled and transformed: no training image equals its undistorted self.
    matches = sum(np.any(np.all(expected == image, axis=(1, 2, 3))) for image in augmented)
    assert matches < 4


def test_augmentation_stack_follows_the_config():
    names = [type(x).__name__ for x in build_augmentation(AugmentationConfig(), seed=0).layers]
    assert names == ["RandomAffine"]
    affine = build_augmentation(AugmentationConfig(), seed=0).layers[0]
    assert (affine.rotation_degrees, affine.width_shift, affine.height_shift, affine.zoom) == (
        20.0,
        0.2,
        0.2,
        0.2,
    )
    assert affine.horizontal_flip is True
    full = build_augmentation(AugmentationConfig(brightness=0.2, contrast=0.3), seed=0)
    assert [type(x).__name__ for x in full.layers][-2:] == ["RandomBrightness", "RandomContrast"]
    assert build_augmentation(NO_GEOMETRY, seed=0) is None


NO_GEOMETRY = AugmentationConfig(
    horizontal_flip=False, rotation_degrees=0, width_shift=0, height_shift=0, zoom=0
)


def test_random_affine_with_zero_ranges_is_the_identity_and_flip_is_a_mirror():
    images = np.random.default_rng(2).uniform(0, 255, (6, 12, 10, 3)).astype("float32")
    identity = RandomAffine(0, 0, 0, 0, horizontal_flip=False, seed=1)
    np.testing.assert_allclose(identity(images, training=True).numpy(), images, atol=1e-3)
    flip = RandomAffine(0, 0, 0, 0, horizontal_flip=True, seed=1)
    flipped = flip(np.concatenate([images] * 8), training=True).numpy()
    mirrored = 0
    for index, output in enumerate(flipped):
        source = images[index % 6]
        if np.allclose(output, source[:, ::-1], atol=1e-3):
            mirrored += 1
        else:
            np.testing.assert_allclose(output, source, atol=1e-3)
    assert 8 <= mirrored <= 40  # about half of 48, never all or none
    assert np.array_equal(identity(images, training=False), images)


def test_random_affine_moves_pixels_within_the_configured_range():
    image = np.zeros((1, 41, 41, 1), dtype="float32")
    image[0, 20, 20, 0] = 255.0  # one bright pixel at the centre
    shift = RandomAffine(
        0,
        width_shift=0.25,
        height_shift=0.0,
        zoom=0,
        horizontal_flip=False,
        interpolation="nearest",
        fill_mode="constant",
        seed=4,
    )
    columns = set()
    for _ in range(30):
        out = shift(image, training=True).numpy()[0, :, :, 0]
        rows, cols = np.nonzero(out)
        assert set(rows) <= {20}
        columns.update(cols.tolist())
    assert min(columns) >= 20 - 11 and max(columns) <= 20 + 11  # 0.25 * 41 = 10.25 pixels
    assert len(columns) > 5


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["seed-cnn", *BACKBONES])
def test_every_architecture_builds_and_takes_a_training_step(arch):
    keras.utils.set_random_seed(0)
    model, backbone = build_model(arch, (32, 32, 3), 3, weights="none", l2=1e-4)
    assert not any("Random" in type(layer).__name__ for layer in model.layers)
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    labels = keras.utils.to_categorical([0, 1, 2, 1], 3)
    model.compile("adam", "categorical_crossentropy")
    before = [w.copy() for w in model.get_weights()]
    loss = model.train_on_batch(images, labels)
    assert np.isfinite(loss)
    changed = any(
        not np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True)
    )
    assert changed
    probabilities = model.predict(images, verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    if backbone is not None:
        assert not backbone.trainable
        assert unfreeze_top(backbone, 5) >= 1
        frozen_bn = [
            layer
            for layer in backbone.layers
            if type(layer).__name__ == "BatchNormalization" and layer.trainable
        ]
        assert not frozen_bn


def test_seed_cnn_is_the_documented_stack():
    model, _ = build_model("seed-cnn", (64, 64, 3), 10, weights="none")
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == [
        "InputLayer",
        "Rescaling",
        "Conv2D",
        "BatchNormalization",
        "MaxPooling2D",
        "Conv2D",
        "BatchNormalization",
        "MaxPooling2D",
        "Conv2D",
        "BatchNormalization",
        "MaxPooling2D",
        "Flatten",
        "Dense",
        "BatchNormalization",
        "Activation",
        "Dropout",
        "Dense",
        "BatchNormalization",
        "Activation",
        "Dropout",
        "Dense",
    ]
    # Fast-moving BN statistics: a small data set gives few steps an epoch.
    assert {
        layer.momentum for layer in model.layers if type(layer).__name__ == "BatchNormalization"
    } == {0.9}
    assert [layer.filters for layer in model.layers if hasattr(layer, "filters")] == [32, 64, 128]
    assert [layer.units for layer in model.layers if type(layer).__name__ == "Dense"] == [
        128,
        64,
        10,
    ]


@pytest.mark.slow
def test_local_weights_file_is_loaded(tmp_path):
    _source, backbone = build_model("mobilenetv2", (32, 32, 3), 2, weights="none")
    path = tmp_path / "backbone.weights.h5"
    backbone.save_weights(path)
    _, loaded = build_model("mobilenetv2", (32, 32, 3), 2, weights=str(path))
    for a, b in zip(backbone.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_backbone_preprocessing_round_trips_through_a_safe_mode_save(tmp_path):
    model, _ = build_model("resnet50", (32, 32, 3), 2, weights="none")
    path = tmp_path / "m.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    images = np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        reloaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6
    )
