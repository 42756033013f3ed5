"""What ``/explain?method=cam`` needs of a Keras model, found and checked at export.

The model is split at its last rectified feature map (the output of the last convolution,
or activation, with a ReLU and four dimensions): ``conv128`` in the seed CNN, ``out_relu`` in
MobileNetV2, ``conv5_block3_out`` in ResNet50, ``block5_conv3`` in VGG16. The map becomes the
ONNX graph's third output, ``feature_map`` (NHWC, named in Keras, so the converter keeps its
layout), and the layers after it, the head, are written as plain arrays
(``serving.core.cam.Head``) for serving to run forward and back in NumPy.

The gate (``check_cam_parity``): on held-out images, the head must give back the model's own
probabilities from the ONNX map, and the NumPy maps (``serving.core.cam``) must match the
same maps computed with TensorFlow's ``GradientTape`` on the Keras model; the figures go to
``parity.json``.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from serving.core.cam import Head, HeadLayer, class_activation_maps
from serving.core.explain import normalised
from training.parity import ParityError

#: How far the NumPy maps (each scaled to [0, 1]) may lie from TensorFlow's.
MAP_TOLERANCE = 1e-3
#: How far the head's probabilities from the ONNX feature map may lie from the graph's own.
PROBABILITY_TOLERANCE = 1e-4
_CONVOLUTIONS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)


@dataclass(frozen=True)
class Split:
    """A model cut at its last rectified feature map."""

    #: The layer whose output is the feature map.
    feature_layer: keras.layers.Layer
    #: The nested model (a keras.applications backbone) that holds it, if any.
    owner: keras.Model | None
    #: The layers after it, in order, up to the softmax Dense layer.
    head_layers: tuple[keras.layers.Layer, ...]

    def describe(self, feature_shape: tuple[int, ...]) -> dict:
        return {
            "layer": self.feature_layer.name,
            "shape": [int(d) for d in feature_shape],
            "head": [layer.name for layer in self.head_layers],
        }


def split_model(model: keras.Model) -> Split | None:
    """Walk back from the softmax layer through layers a head may hold to the last
    rectified 4-D map; None (no cam for this model) when another layer comes first."""
    chain = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            chain += [(layer, inner) for inner in layer.layers]
        else:
            chain.append((None, layer))
    head = []
    for owner, layer in reversed(chain):
        if isinstance(layer, keras.layers.InputLayer):
            return None
        if _is_rectified_map(layer):
            return Split(layer, owner, tuple(reversed(head)))
        if _head_layers(layer, last=not head) is None:
            return None
        head.append(layer)
    return None


def features_model(model: keras.Model, split: Split | None) -> keras.Model:
    """The model with its penultimate features (the input of the softmax layer, for
    embedding drift) and, where it splits, its feature map as further outputs."""
    last = model.layers[-1]
    if split is None:
        return keras.Model(model.input, [model.output, last.input], name=f"{model.name}_features")
    if split.owner is None:
        outputs = [model.output, last.input, split.feature_layer.output]
        return keras.Model(model.input, outputs, name=f"{model.name}_features")
    # The map lies inside the backbone: the top level is replayed with a backbone that
    # answers its map as well (the same layers, the same weights).
    inner = keras.Model(split.owner.input, [split.feature_layer.output, split.owner.output])
    x, feature_map = model.input, None
    for layer in model.layers[1:]:
        penultimate = x
        if layer is split.owner:
            feature_map, x = inner(x)
        else:
            x = layer(x)
    return keras.Model(model.input, [x, penultimate, feature_map], name=f"{model.name}_features")


def head_of(split: Split) -> Head:
    """The head as NumPy runs it: BatchNormalization folded, Dropout left out, the softmax
    Dense layer kept as its logits."""
    layers = []
    for position, layer in enumerate(split.head_layers):
        layers += _head_layers(layer, last=position == len(split.head_layers) - 1)
    return Head(tuple(layers))


def tensorflow_maps(split: Split, feature_maps: np.ndarray, class_indices) -> np.ndarray:
    """The reference: the same maps with TensorFlow's ``GradientTape`` through the Keras
    layers of the head, the class's logit (the softmax layer's kernel and bias)
    differentiated."""
    feature_maps = tf.constant(feature_maps)
    *body, last = split.head_layers
    with tf.GradientTape() as tape:
        tape.watch(feature_maps)
        x = feature_maps
        for layer in body:
            x = layer(x, training=False)
        logits = tf.matmul(x, last.kernel) + last.bias
        scores = tf.gather(logits, tf.constant(class_indices), axis=1, batch_dims=1)
    gradients = tape.gradient(scores, feature_maps)
    return tf.nn.relu(tf.reduce_sum(feature_maps * gradients, axis=-1)).numpy()


def check_cam_parity(
    split: Split,
    features: keras.Model,
    head: Head,
    onnx_outputs: tuple[np.ndarray, np.ndarray],
    images: np.ndarray,
) -> dict:
    """The gate: from the ONNX graph's ``(probabilities, feature_map)`` of ``images``, the
    head gives back the probabilities and NumPy's maps of the top-1 class match
    TensorFlow's on the Keras model; ``ParityError`` (nothing published) if not."""
    probabilities, feature_maps = onnx_outputs
    classes = probabilities.argmax(axis=1)
    logits, _ = head.logits_and_gradients(feature_maps, classes)
    from_head = np.exp(logits - logits.max(axis=1, keepdims=True))
    from_head /= from_head.sum(axis=1, keepdims=True)
    head_difference = float(np.abs(from_head - probabilities).max())
    keras_maps = features.predict(images, verbose=0, batch_size=64)[2]
    expected = tensorflow_maps(split, keras_maps, classes)
    found = class_activation_maps(head, feature_maps, classes)
    difference = max(
        float(np.abs(normalised(mine) - normalised(theirs)).max())
        for mine, theirs in zip(found, expected, strict=True)
    )
    report = {
        "method": "hirescam",
        "images": len(images),
        "head_max_abs_diff": head_difference,
        "map_max_abs_diff": difference,
        "tolerance": f"head <= {PROBABILITY_TOLERANCE:g}, maps (scaled to [0, 1]) <= "
        f"{MAP_TOLERANCE:g}",
        "passed": head_difference <= PROBABILITY_TOLERANCE and difference <= MAP_TOLERANCE,
    }
    if not report["passed"]:
        raise ParityError(
            "parity check failed: the class-activation maps from the ONNX feature map differ "
            f"from TensorFlow's (probabilities by up to {head_difference:.3g}, maps "
            f"by up to {difference:.3g}); nothing was published"
        )
    return report


def _is_rectified_map(layer: keras.layers.Layer) -> bool:
    """A 4-D output through a ReLU: a convolution with a ReLU, or a ReLU layer."""
    if len(layer.output.shape) != 4:
        return False
    if isinstance(layer, _CONVOLUTIONS):
        return layer.activation is keras.activations.relu
    return _is_relu(layer)


def _is_relu(layer: keras.layers.Layer) -> bool:
    if isinstance(layer, keras.layers.ReLU):
        return not layer.negative_slope and not layer.threshold
    return isinstance(layer, keras.layers.Activation) and layer.activation is keras.activations.relu


def _head_layers(layer: keras.layers.Layer, *, last: bool) -> list[HeadLayer] | None:
    """What NumPy runs for one Keras layer of the head (None: a layer it cannot run). The
    last layer is the softmax Dense layer, taken as its logits."""
    if isinstance(layer, keras.layers.Dense):
        activation = layer.activation
        if last != (activation is keras.activations.softmax):
            return None
        if not last and activation not in (keras.activations.relu, keras.activations.linear):
            return None
        kernel = layer.kernel.numpy()
        bias = layer.bias.numpy() if layer.use_bias else np.zeros(kernel.shape[1], np.float32)
        dense = HeadLayer("dense", {}, {"kernel": kernel, "bias": bias})
        relu = activation is keras.activations.relu
        return [dense, HeadLayer("relu", {}, {})] if relu else [dense]
    if last:
        return None
    if isinstance(layer, keras.layers.Dropout):
        return []
    if isinstance(layer, keras.layers.Flatten):
        return [HeadLayer("flatten", {}, {})]
    if isinstance(layer, keras.layers.GlobalAveragePooling2D):
        return None if layer.keepdims else [HeadLayer("global_average_pool", {}, {})]
    if _is_relu(layer):
        top = getattr(layer, "max_value", None)
        return [HeadLayer("relu", {} if top is None else {"max_value": float(top)}, {})]
    if isinstance(layer, keras.layers.MaxPooling2D):
        if tuple(layer.pool_size) != tuple(layer.strides) or layer.padding != "valid":
            return None
        return [HeadLayer("max_pool", {"size": [int(s) for s in layer.pool_size]}, {})]
    if isinstance(layer, keras.layers.BatchNormalization):
        axes = layer.axis if isinstance(layer.axis, list | tuple) else [layer.axis]
        if [a % len(layer.input.shape) for a in axes] != [len(layer.input.shape) - 1]:
            return None
        variance = layer.moving_variance.numpy()
        scale = 1.0 / np.sqrt(variance + layer.epsilon)
        if layer.scale:
            scale = scale * layer.gamma.numpy()
        shift = -layer.moving_mean.numpy() * scale
        if layer.center:
            shift = shift + layer.beta.numpy()
        return [HeadLayer("affine", {}, {"scale": scale, "shift": shift})]
    return None
