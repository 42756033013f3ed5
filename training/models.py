"""Model builders: the seed CNN and transfer-learning heads on keras.applications backbones.

Every model takes float32 images in [0, 255] (the preprocessing contract) and does its own
scaling inside the graph, so serving never needs to know which architecture it runs.
"""

from __future__ import annotations

import contextlib
import io
import logging
import urllib.error
import warnings
from pathlib import Path

import keras
from keras import layers, regularizers

from serving.core.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

BACKBONES = {
    "mobilenetv2": (keras.applications.MobileNetV2, keras.applications.mobilenet_v2),
    "resnet50": (keras.applications.ResNet50, keras.applications.resnet50),
    "vgg16": (keras.applications.VGG16, keras.applications.vgg16),
}


@keras.saving.register_keras_serializable(package="imgclf")
class BackbonePreprocess(layers.Layer):
    """The backbone's own ``preprocess_input`` as a named, serialisable layer (no Lambda, so
    checkpoints load with ``safe_mode=True``)."""

    def __init__(self, arch: str, **kwargs) -> None:
        super().__init__(**kwargs)
        if arch not in BACKBONES:
            raise ValueError(f"no backbone preprocessing for {arch!r}")
        self.arch = arch

    def call(self, inputs):
        return BACKBONES[self.arch][1].preprocess_input(inputs)

    def get_config(self) -> dict:
        return {**super().get_config(), "arch": self.arch}


def build_model(
    arch: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    weights: str = "none",
    dropout: float = 0.5,
    l2: float = 1e-4,
) -> tuple[keras.Model, keras.Model | None]:
    """Return ``(model, backbone)``; ``backbone`` is None for the seed CNN."""
    if arch == "seed-cnn":
        model = seed_cnn(input_shape, num_classes, dropout=dropout, l2=l2)
        if weights not in ("none", "imagenet"):
            _load_weights(model, weights)
        return model, None
    if arch not in BACKBONES:
        raise ConfigError(
            f"unknown architecture {arch!r}; choose seed-cnn or {', '.join(BACKBONES)}"
        )
    return transfer_model(arch, input_shape, num_classes, weights=weights, dropout=dropout, l2=l2)


#: How fast BatchNormalization's moving statistics follow the batches. Keras' default (0.99)
#: needs about 500 steps to forget its initial variance of 1; on a small data set (40 steps
#: an epoch for the digits at batch 32) inference-mode BN stayed ~30x off for 10+ epochs, so
#: validation sat at chance while training learned, and EarlyStopping kept epoch 1.
BN_MOMENTUM = 0.9


def seed_cnn(
    input_shape: tuple[int, int, int], num_classes: int, *, dropout: float = 0.5, l2: float = 1e-4
) -> keras.Model:
    """Conv-BN-Pool x3 (32/64/128) -> Dense 128 -> Dense 64 -> softmax, scaling inside."""
    penalty = regularizers.L2(l2) if l2 > 0 else None
    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inputs)
    for filters in (32, 64, 128):
        x = layers.Conv2D(
            filters,
            3,
            padding="same",
            activation="relu",
            kernel_regularizer=penalty,
            name=f"conv{filters}",
        )(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"bn{filters}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{filters}")(x)
    x = layers.Flatten(name="flatten")(x)
    for units in (128, 64):
        # Normalised before the ReLU: the first Adam steps on Flatten's wide input (8,192
        # values at 64x64) otherwise push every unit negative at once and training stops.
        x = layers.Dense(units, use_bias=False, kernel_regularizer=penalty, name=f"dense{units}")(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"bn_dense{units}")(x)
        x = layers.Activation("relu", name=f"relu{units}")(x)
        x = layers.Dropout(dropout, name=f"dropout{units}")(x)
    outputs = layers.Dense(
        num_classes, activation="softmax", kernel_regularizer=penalty, name="probabilities"
    )(x)
    return keras.Model(inputs, outputs, name="seed_cnn")


def transfer_model(
    arch: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    weights: str = "imagenet",
    dropout: float = 0.5,
    l2: float = 1e-4,
) -> tuple[keras.Model, keras.Model]:
    """A frozen keras.applications backbone with its own preprocessing and a new softmax head."""
    if input_shape[-1] != 3:
        raise ConfigError(f"{arch} needs 3-channel input; set data.channels to 3")
    if min(input_shape[:2]) < 32:
        raise ConfigError(
            f"{arch} needs inputs of at least 32x32, got {input_shape[0]}x{input_shape[1]}"
        )
    constructor = BACKBONES[arch][0]
    backbone = _backbone(constructor, arch, input_shape, weights)
    backbone.trainable = False
    penalty = regularizers.L2(l2) if l2 > 0 else None
    inputs = keras.Input(shape=input_shape, name="image")
    x = BackbonePreprocess(arch, name="backbone_preprocess")(inputs)
    # training=False keeps BatchNormalization statistics frozen during fine-tuning as well.
    x = backbone(x, training=False)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    outputs = layers.Dense(
        num_classes, activation="softmax", kernel_regularizer=penalty, name="probabilities"
    )(x)
    return keras.Model(inputs, outputs, name=f"{arch}_classifier"), backbone


def unfreeze_top(backbone: keras.Model, count: int, *, l2: float = 0.0) -> int:
    """Unfreeze the top ``count`` layers (BatchNormalization stays frozen); return how many."""
    backbone.trainable = True
    trainable = 0
    cut = max(len(backbone.layers) - count, 0)
    for position, layer in enumerate(backbone.layers):
        layer.trainable = position >= cut and not isinstance(layer, layers.BatchNormalization)
        if layer.trainable and getattr(layer, "kernel", None) is not None:
            trainable += 1
            if l2 > 0:
                layer.kernel.regularizer = regularizers.L2(l2)
    return trainable


def _backbone(constructor, arch: str, input_shape, weights: str) -> keras.Model:
    kwargs = dict(include_top=False, input_shape=input_shape, pooling="avg")
    if weights == "none":
        return constructor(weights=None, **kwargs)
    if weights == "imagenet":
        try:
            return _imagenet_backbone(constructor, arch, kwargs)
        except (urllib.error.URLError, OSError, Exception) as error:
            if not _looks_like_download_failure(error):
                raise
            raise ModelError(
                f"cannot download ImageNet weights for {arch} (no network?): "
                f"{_first_line(error)}; pass --weights PATH to a local .h5/.weights.h5 file "
                "or --weights none"
            ) from error
    backbone = constructor(weights=None, **kwargs)
    _load_weights(backbone, weights)
    return backbone


def _imagenet_backbone(constructor, arch: str, kwargs: dict) -> keras.Model:
    """keras.applications' own download, without its chatter.

    Offline, its "Downloading data from" line (stdout) and its input-size warning would come
    before our one-line error; with ``include_top=False`` the 224x224 weights fit any input
    size, so that warning says nothing. The download's output is held back and replaced by
    one log line once the weights are in Keras' cache.
    """
    download_output = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(download_output):
        warnings.filterwarnings(
            "ignore", message=".*will be loaded as the default", category=UserWarning
        )
        backbone = constructor(weights="imagenet", **kwargs)
    if "Downloading data from" in download_output.getvalue():
        log.info("downloaded the ImageNet weights for %s into Keras' cache", arch)
    return backbone


def _load_weights(model: keras.Model, path: str) -> None:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"weights file {path} does not exist (use imagenet, none or a file path)")
    try:
        model.load_weights(str(file), skip_mismatch=False)
    except Exception as error:
        raise ModelError(
            f"cannot load weights from {path} into {model.name}: {_first_line(error)}"
        ) from error


def _looks_like_download_failure(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return isinstance(error, urllib.error.URLError) or any(
        word in text for word in ("url fetch failure", "urlopen", "http", "connection", "resolve")
    )


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:300]
