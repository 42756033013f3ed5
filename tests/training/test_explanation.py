"""What ``/explain?method=cam`` needs of a model, found and checked at export
(``training.explanation``), and the NumPy maps that serving computes from it
(``serving.core.cam``): every architecture imgclf trains splits at its last rectified feature
map, NumPy's maps equal TensorFlow's ``GradientTape`` ones, and the gate refuses a head that
does not."""

from __future__ import annotations

import json

import numpy as np
import pytest

keras = pytest.importorskip("keras")
import onnxruntime as ort  # noqa: E402

from serving.core.cam import Head, class_activation_maps  # noqa: E402
from serving.core.errors import ModelError  # noqa: E402
from serving.core.explain import normalised  # noqa: E402
from serving.core.model_dir import load_metadata  # noqa: E402
from serving.core.runtime import ClassifierRuntime  # noqa: E402
from training import explanation  # noqa: E402
from training.models import build_model  # noqa: E402
from training.parity import ParityError  # noqa: E402

#: The input size: 64x64 gives the backbones a 2x2 feature map (32x32: 1x1, one number a map).
SIZE = 64
#: Where each architecture's map is taken, and the kinds of layer of the head after it.
SPLITS = {
    "seed-cnn": ("conv128", ["BatchNormalization", "MaxPooling2D", "Flatten", "Dense"]),
    "mobilenetv2": ("out_relu", ["GlobalAveragePooling2D", "Dropout", "Dense"]),
    "resnet50": ("conv5_block3_out", ["GlobalAveragePooling2D", "Dropout", "Dense"]),
    "vgg16": ("block5_conv3", ["MaxPooling2D", "GlobalAveragePooling2D", "Dropout", "Dense"]),
}


def built(arch: str) -> keras.Model:
    """An untrained model with every weight drawn at random (BatchNormalization's moving
    statistics included, which start at 0 and 1), so that no layer is an identity. Seeded:
    the same weights in every run (unseeded, ResNet50's maps were all zeros for some images
    in one run of several)."""
    keras.utils.set_random_seed(0)
    model, _ = build_model(arch, (SIZE, SIZE, 3), 4, weights="none", dropout=0.3)
    rng = np.random.default_rng(0)
    for layer in model.layers[-1:]:
        layer.kernel.assign(rng.normal(0, 0.5, layer.kernel.shape).astype(np.float32))
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            size = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(0, 0.2, size).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size).astype(np.float32))
    return model


@pytest.fixture(scope="module", params=list(SPLITS))
def arch_and_model(request):
    return request.param, built(request.param)


def images(count: int = 6) -> np.ndarray:
    return np.random.default_rng(1).uniform(0, 255, (count, SIZE, SIZE, 3)).astype(np.float32)


def test_every_architecture_splits_at_its_last_rectified_map(arch_and_model):
    arch, model = arch_and_model
    split = explanation.split_model(model)
    layer, head_starts = SPLITS[arch]
    assert split is not None and split.feature_layer.name == layer
    assert [type(h).__name__ for h in split.head_layers][: len(head_starts)] == head_starts
    assert split.head_layers[-1] is model.layers[-1]  # up to the softmax layer


def test_numpy_maps_equal_tensorflows(arch_and_model):
    """The features model answers the model's own probabilities; from its feature map the
    NumPy head gives them back, and NumPy's maps are TensorFlow's (GradientTape)."""
    _, model = arch_and_model
    split = explanation.split_model(model)
    features = explanation.features_model(model, split)
    batch = images()
    probabilities, embedding, feature_maps = features.predict(batch, verbose=0)
    np.testing.assert_allclose(probabilities, model.predict(batch, verbose=0), atol=1e-6)
    assert embedding.shape[0] == len(batch) and feature_maps.ndim == 4
    head = Head.from_bytes(explanation.head_of(split).to_bytes())
    positive = 0
    for klass in range(4):
        classes = np.full(len(batch), klass)
        logits, _ = head.logits_and_gradients(feature_maps, classes)
        np.testing.assert_allclose(
            np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True), probabilities, atol=1e-5
        )
        mine = class_activation_maps(head, feature_maps, classes)
        theirs = explanation.tensorflow_maps(split, feature_maps, classes)
        assert mine.shape == feature_maps.shape[:3]
        positive += int((mine.max(axis=(1, 2)) > 0).sum())
        for found, expected in zip(mine, theirs, strict=True):
            np.testing.assert_allclose(normalised(found), normalised(expected), atol=1e-4)
    assert positive >= len(batch), positive  # not a comparison of maps that are all zeros


def test_after_global_average_pooling_the_map_is_cam():
    """MobileNetV2's head (pooling, Dropout, Dense): the map is CAM (Zhou et al., 2016), the
    feature map weighed by the class's column of the Dense kernel."""
    model = built("mobilenetv2")
    split = explanation.split_model(model)
    feature_maps = explanation.features_model(model, split).predict(images(2), verbose=0)[2]
    kernel = model.layers[-1].kernel.numpy()
    found = class_activation_maps(explanation.head_of(split), feature_maps, [1, 3])
    for index, klass in enumerate((1, 3)):
        cam = np.clip(feature_maps[index] @ kernel[:, klass], 0, None)
        np.testing.assert_allclose(normalised(found[index]), normalised(cam), atol=1e-5)


def test_the_gate_refuses_a_head_that_differs():
    model = built("seed-cnn")
    split = explanation.split_model(model)
    features = explanation.features_model(model, split)
    batch = images()
    probabilities, _, feature_maps = features.predict(batch, verbose=0)
    good = explanation.head_of(split)
    report = explanation.check_cam_parity(
        split, features, good, (probabilities, feature_maps), batch
    )
    assert report["passed"] and report["map_max_abs_diff"] <= 1e-3
    first = good.layers[0]  # the folded BatchNormalization
    changed = first.arrays | {"scale": first.arrays["scale"] * 1.05}
    bad = Head((type(first)(first.kind, first.options, changed), *good.layers[1:]))
    with pytest.raises(ParityError, match="class-activation maps"):
        explanation.check_cam_parity(split, features, bad, (probabilities, feature_maps), batch)


def test_a_model_without_a_rectified_map_has_no_split():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, activation="tanh")(inputs)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x))
    assert explanation.split_model(model) is None


def test_the_export_writes_the_map_the_head_and_their_gate(published_model):
    """The published version: the feature map as the graph's third output (the
    probabilities first), the head hashed in metadata.json, the gate's figures in
    parity.json."""
    session = ort.InferenceSession(str(published_model / "model.onnx"))
    outputs = [o.name for o in session.get_outputs()]
    assert outputs == ["probabilities", "embedding", "feature_map"]
    metadata = load_metadata(published_model)
    described = metadata["explanation"]
    assert described["layer"] == "conv128" and described["output"] == "feature_map"
    assert described["shape"] == list(session.get_outputs()[2].shape[1:])
    assert "explanation.npz" in metadata["files"]
    report = json.loads((published_model / "parity.json").read_text())["explanation"]
    assert report["passed"] and report["images"] > 0
    assert report["head_max_abs_diff"] <= 1e-4 and report["map_max_abs_diff"] <= 1e-3


def test_a_changed_head_refuses_the_version(tmp_path, published_model):
    import shutil

    copy = tmp_path / "1"
    shutil.copytree(published_model, copy)
    head = Head.from_bytes((copy / "explanation.npz").read_bytes())
    (copy / "explanation.npz").write_bytes(Head(head.layers[:-1]).to_bytes())
    with pytest.raises(ModelError, match=r"explanation\.npz does not match its hash"):
        ClassifierRuntime(copy, provider="cpu").verify()
