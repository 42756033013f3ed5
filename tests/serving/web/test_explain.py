"""``POST /explain`` and ``serving.core.explain``, by both methods: the map is right where
the answer is known (a hand-built red detector, the evidence in each quadrant in turn), it
depends on the model (the last layer shuffled) and on the evidence (deleting pixels in map
order costs the class faster than at random, on held-out digits), cam and occlusion agree,
and the route answers as ``/predict`` does: the same label, the same errors. A version
exported before cam keeps being explained, by occlusion."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from scipy.stats import spearmanr

from serving.core.cam import Head
from serving.core.errors import ImgclfError
from serving.core.explain import (
    GRID,
    cells,
    explain_offline,
    method_for,
    occlusion_images,
    upsampled,
)
from serving.core.model_dir import file_hashes, load_metadata
from serving.core.runtime import ClassifierRuntime
from tests.conftest import assert_one_line_error, run_cli
from tests.serving.cases import good_images
from tests.serving.conftest import Server
from training.datasets import read_manifest

GOOD = good_images()
SIZE = 28  # a multiple of nothing in particular: cells of 4 pixels
CELL = SIZE // GRID


#: The red detector's weights: a 1x1 convolution that answers how red a pixel is (R minus the
#: mean of G and B, over 255), and a Dense layer to "red" and "not red" from its mean. Not
#: saturated: covering a quarter of the red square moves "red" from 0.88 to 0.62.
REDNESS = np.array([1.0, -0.5, -0.5], np.float32) / 255
DENSE = np.array([[90.0, 0.0]], np.float32)
BIAS = np.array([0.0, 4.0], np.float32)


def red_detector(folder, published_model) -> ClassifierRuntime:
    """No training: the redness convolution, ReLU, the mean over the image, and the Dense
    layer: the evidence for "red" is where the red pixels are, and nowhere else. Written as
    ONNX by hand, as a version exported before cam was (no feature map, no head)."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", SIZE, SIZE, 3])
    output = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])
    weights = {"redness": REDNESS.reshape(1, 3, 1, 1), "dense": DENSE, "bias": BIAS}
    nodes = [
        helper.make_node("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "redness"], ["red"]),
        helper.make_node("Relu", ["red"], ["evidence"]),
        helper.make_node("GlobalAveragePool", ["evidence"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["features"]),
        helper.make_node("Gemm", ["features", "dense", "bias"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "red-detector",
        [image],
        [output],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    return described_red_detector(folder, published_model)


def exported_red_detector(folder, published_model) -> ClassifierRuntime:
    """The same detector as a Keras model, through the export's own code: the graph with its
    feature map, the head, and the gate that checks it against TensorFlow."""
    keras = pytest.importorskip("keras")
    from training import explanation
    from training.export import serving_function, write_explanation_head, write_onnx

    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    evidence = keras.layers.Conv2D(1, 1, activation="relu", name="redness")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D(name="pooled")(evidence)
    outputs = keras.layers.Dense(2, activation="softmax", name="probabilities")(pooled)
    model = keras.Model(inputs, outputs)
    model.get_layer("redness").set_weights([REDNESS.reshape(1, 1, 3, 1), np.zeros(1)])
    model.get_layer("probabilities").set_weights([DENSE, BIAS])
    split = explanation.split_model(model)
    features = explanation.features_model(model, split)
    folder.mkdir(parents=True)
    write_onnx(serving_function(features, (SIZE, SIZE, 3)), (SIZE, SIZE, 3), folder / "model.onnx")
    quadrants = [with_red_in(q) for q in ((0, 0), (0, 1), (1, 0), (1, 1))]
    write_explanation_head(split, features, folder, np.stack(quadrants))
    return described_red_detector(folder, published_model)


def described_red_detector(folder, published_model) -> ClassifierRuntime:
    """``metadata.json`` for a detector's folder (the test model's, resized and renamed)."""
    metadata = json.loads((published_model / "metadata.json").read_text())
    metadata.pop("explanation", None)
    contract = metadata["preprocessing"] | {"height": SIZE, "width": SIZE}
    metadata.update(
        name="red",
        version=1,
        classes=["red", "not red"],
        input=metadata["input"] | {"height": SIZE, "width": SIZE},
        preprocessing=contract,
        files=file_hashes(folder),
    )
    (folder / "metadata.json").write_text(json.dumps(metadata))
    return ClassifierRuntime(folder, provider="cpu").verify()


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def with_red_in(quadrant: tuple[int, int]) -> np.ndarray:
    """A grey image with a red square in one quadrant (row, column), a cell inside it."""
    image = np.full((SIZE, SIZE, 3), 120.0, np.float32)
    row, column = (q * SIZE // 2 + CELL for q in quadrant)
    image[row : row + 2 * CELL, column : column + 2 * CELL] = (230.0, 20.0, 20.0)
    return image


@pytest.fixture(scope="module")
def detector(tmp_path_factory, published_model) -> ClassifierRuntime:
    return exported_red_detector(tmp_path_factory.mktemp("red") / "1", published_model)


def quadrant_of(shape: tuple[int, int], quadrant: tuple[int, int]) -> np.ndarray:
    """A mask of one quadrant (row, column) of a map (the middle row and column of an odd
    one are shared: left out)."""
    half_rows, half_columns = shape[0] // 2, shape[1] // 2
    rows = slice(0, half_rows) if quadrant[0] == 0 else slice(shape[0] - half_rows, shape[0])
    columns = (
        slice(0, half_columns) if quadrant[1] == 0 else slice(shape[1] - half_columns, shape[1])
    )
    inside = np.zeros(shape, dtype=bool)
    inside[rows, columns] = True
    return inside


@pytest.mark.parametrize("method", ["cam", "occlusion"])
@pytest.mark.parametrize("quadrant", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_the_map_lies_where_the_evidence_is(detector, quadrant, method):
    image = detector.preprocess(png(with_red_in(quadrant)))
    found = explain_offline(detector, image, "red", method)
    assert found["label"] == "red" and found["class"] == "red" and found["method"] == method
    heat = found["map"]
    assert heat.shape == ((SIZE, SIZE) if method == "cam" else (GRID, GRID))
    inside = quadrant_of(heat.shape, quadrant)
    top = np.unravel_index(np.argmax(heat), heat.shape)
    assert inside[top], (quadrant, np.round(heat, 2))
    assert heat[inside].sum() >= 0.8 * heat.sum(), np.round(heat, 2)


@pytest.mark.parametrize("method", ["cam", "occlusion"])
def test_a_map_for_the_other_class_is_not_the_same(detector, method):
    """Covering the red square lowers "red" and raises "not red"; nothing in the image is
    evidence for "not red" (its weight on the redness is 0): the cells that hold the whole
    evidence for one class hold none for the other."""
    image = detector.preprocess(png(with_red_in((0, 0))))
    red = explain_offline(detector, image, "red", method)["map"]
    not_red = explain_offline(detector, image, "not red", method)["map"]
    scale = red.shape[0] / SIZE  # the square: pixels CELL to 3 CELL, in map positions
    square = (slice(round(CELL * scale), round(3 * CELL * scale)),) * 2
    assert red[square].min() > 0.5 and (not_red[square] == 0).all()


def test_a_version_exported_before_cam_is_explained_by_occlusion(tmp_path, published_model):
    old = red_detector(tmp_path / "1", published_model)
    assert not old.has_class_activation and method_for(old, None) == "occlusion"
    assert explain_offline(old, old.preprocess(png(with_red_in((1, 0)))))["method"] == "occlusion"
    with pytest.raises(ImgclfError, match="no class-activation graph") as refused:
        explain_offline(old, old.preprocess(png(with_red_in((1, 0)))), method="cam")
    assert refused.value.status_code == 422


def test_occluded_copies_cover_one_cell_each_with_the_mean_colour():
    image = np.arange(SIZE * SIZE * 3, dtype=np.float32).reshape(SIZE, SIZE, 3)
    copies = occlusion_images(image)
    assert copies.shape == (1 + GRID * GRID, SIZE, SIZE, 3)
    assert np.array_equal(copies[0], image)
    changed = (copies[1:] != image).any(axis=-1)
    assert changed.reshape(GRID * GRID, -1).any(axis=1).all()
    assert changed.sum(axis=0).max() == 1  # no pixel covered twice


def deletion_cost(runtime, image: np.ndarray, index: int, order) -> float:
    """The class's mean probability while the first third of the cells, in ``order``, are
    covered one after another with the image's mean colour (lower: faster deletion)."""
    covered, fill, grid = image.copy(), image.reshape(-1, 3).mean(axis=0), cells(*image.shape[:2])
    curve = []
    for cell in order[: GRID * GRID // 3]:
        covered[grid[cell]] = fill
        curve.append(runtime.predict(covered[None])[0, index])
    return float(np.mean(curve))


def on_grid(heat: np.ndarray, height: int, width: int) -> np.ndarray:
    """A map of any size as the occlusion grid's cells see it: at the image's size, then
    each cell's mean."""
    full = upsampled(heat, height, width)
    return np.array([full[cell].mean() for cell in cells(height, width)]).reshape(GRID, GRID)


@pytest.mark.parametrize("method", ["cam", "occlusion"])
def test_deleting_pixels_in_map_order_costs_the_class_faster_than_at_random(
    digits_model, test_split, method
):
    """The deletion check (Petsiuk et al., 2018) on 40 held-out digits: cells removed most
    salient first lower the predicted class's probability more than the same cells removed
    in random order."""
    runtime = ClassifierRuntime(digits_model, provider="cpu")
    rng = np.random.default_rng(0)
    by_map, at_random = [], []
    for picture, _ in test_split[:40]:
        image = runtime.preprocess(png(np.asarray(picture.convert("RGB"), np.float32)))
        found = explain_offline(runtime, image, method=method)
        index = runtime.classes.index(found["class"])
        heat = on_grid(found["map"], *image.shape[:2])
        salient_first = np.argsort(-heat.reshape(-1), kind="stable")
        by_map.append(deletion_cost(runtime, image, index, salient_first))
        at_random.append(deletion_cost(runtime, image, index, rng.permutation(GRID * GRID)))
    assert np.mean(by_map) < np.mean(at_random), (np.mean(by_map), np.mean(at_random))


def with_last_layer_shuffled(model_dir, folder) -> ClassifierRuntime:
    """A copy of ``model_dir`` whose last Dense kernel (the one feeding the softmax, in the
    graph and in the head cam differentiates) has its rows shuffled: the same features,
    wired to the classes at random."""
    shutil.copytree(model_dir, folder)
    model = onnx.load(folder / "model.onnx")
    nodes = {output: node for node in model.graph.node for output in node.output}
    softmax = next(node for node in model.graph.node if node.op_type == "Softmax")
    node = nodes[softmax.input[0]]
    while node.op_type not in ("MatMul", "Gemm"):
        node = nodes[node.input[0]]
    kernel = next(i for i in model.graph.initializer if i.name == node.input[1])
    rows = numpy_helper.to_array(kernel)
    order = np.random.default_rng(0).permutation(len(rows))
    kernel.CopyFrom(numpy_helper.from_array(rows[order], kernel.name))
    data = model.SerializeToString()
    (folder / "model.onnx").write_bytes(data)
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata["files"]["model.onnx"] = hashlib.sha256(data).hexdigest()
    head = Head.from_bytes((folder / "explanation.npz").read_bytes())
    last = head.layers[-1]
    assert np.allclose(last.arrays["kernel"], rows)  # the same layer
    shuffled = type(last)(last.kind, last.options, last.arrays | {"kernel": rows[order]})
    data = Head((*head.layers[:-1], shuffled)).to_bytes()
    (folder / "explanation.npz").write_bytes(data)
    metadata["files"]["explanation.npz"] = hashlib.sha256(data).hexdigest()
    (folder / "metadata.json").write_text(json.dumps(metadata))
    return ClassifierRuntime(folder, provider="cpu").verify()


@pytest.mark.parametrize("method", ["cam", "occlusion"])
def test_the_map_depends_on_the_model(digits_model, digits_run, tmp_path, method):
    """The model randomisation check (Adebayo et al., 2018): with the last layer's rows
    shuffled, the maps of the same images and classes no longer rank the cells alike
    (mean Spearman correlation below 0.3, on 40 held-out digits)."""
    trained = ClassifierRuntime(digits_model, provider="cpu")
    shuffled = with_last_layer_shuffled(digits_model, tmp_path / "1")
    correlations = []
    for sample in read_manifest(digits_run)["test"][:40]:
        image = trained.preprocess(sample.path.read_bytes())
        mine = explain_offline(trained, image, method=method)
        theirs = explain_offline(shuffled, image, mine["class"], method)
        rho = spearmanr(mine["map"].ravel(), theirs["map"].ravel()).statistic
        correlations.append(0.0 if np.isnan(rho) else rho)
    assert np.mean(correlations) < 0.3, np.mean(correlations)


def test_cam_and_occlusion_agree_on_held_out_digits(digits_model_32):
    """The two methods, from nothing in common (a gradient at the feature map; 50 forward
    passes of covered copies), rank the cells of 40 held-out digits alike on the 7x7 grid
    (the 32x32 model: an 8x8 feature map): mean Spearman correlation 0.36 on this model,
    0.26 to 0.59 on four 14-epoch seeds of its recipe (docs/explain.md); and better than
    Grad-CAM's mean gradient per channel would (0.16 here), which is why cam is not
    Grad-CAM."""
    runtime = ClassifierRuntime(digits_model_32, provider="cpu")
    run = load_metadata(digits_model_32)["source_run"]
    ours, grad_cams = [], []
    for sample in read_manifest(run)["test"][:40]:
        image = runtime.preprocess(sample.path.read_bytes())
        cam = explain_offline(runtime, image, method="cam")
        index = runtime.classes.index(cam["class"])
        occlusion = explain_offline(runtime, image, cam["class"], "occlusion")["map"].ravel()
        _, feature_maps = runtime.run_outputs(image[None], ("probabilities", "feature_map"))
        _, gradients = runtime.explanation_head().logits_and_gradients(feature_maps, [index])
        grad_cam = np.clip((feature_maps[0] * gradients[0].mean(axis=(0, 1))).sum(-1), 0, None)
        for heat, found in ((cam["map"], ours), (grad_cam, grad_cams)):
            rho = spearmanr(on_grid(heat, *image.shape[:2]).ravel(), occlusion).statistic
            found.append(0.0 if np.isnan(rho) else rho)
    assert np.mean(ours) >= 0.3, np.mean(ours)
    assert np.mean(ours) > np.mean(grad_cams) + 0.1, (np.mean(ours), np.mean(grad_cams))


# The route, in-process (the test server's model).


def test_explain_answers_the_predicted_label_with_a_map(client, published_model):
    data, content_type, _ = GOOD["png"]
    predicted = client.post("/predict", content=data, headers={"Content-Type": content_type})
    answer = client.post("/explain", content=data, headers={"Content-Type": content_type})
    assert answer.status_code == 200, answer.text
    found = answer.json()
    assert set(found) == {"label", "score", "class", "method", "map", "model_version", "request_id"}
    assert found["label"] == found["class"] == predicted.json()["label"]
    assert found["score"] == pytest.approx(predicted.json()["score"], rel=1e-5)
    heat = np.asarray(found["map"])
    # cam by default: the size of the feature map, as metadata.json describes it.
    assert heat.shape == tuple(load_metadata(published_model)["explanation"]["shape"][:2])
    assert heat.min() >= 0 and heat.max() == 1.0
    assert found["method"] == "cam" and found["model_version"] == 1
    assert answer.headers["x-request-id"] == found["request_id"]
    by_occlusion = client.post(
        "/explain?method=occlusion", content=data, headers={"Content-Type": content_type}
    ).json()
    assert by_occlusion["method"] == "occlusion" and by_occlusion["label"] == found["label"]
    assert np.asarray(by_occlusion["map"]).shape == (GRID, GRID)


def test_explain_as_a_picture(client):
    data, content_type, _ = GOOD["jpeg"]
    answer = client.post("/explain?format=png", files={"image": ("digit.jpg", data, content_type)})
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(answer.content))
    assert picture.format == "PNG" and min(picture.size) >= 256


@pytest.mark.parametrize(
    ("query", "status", "says"),
    [
        ("class=nine", 400, "unknown class"),
        ("method=lime", 400, "method must be"),
        ("method=occlusion&class=nine", 400, "unknown class"),
        ("format=gif", 400, "format must be"),
    ],
)
def test_explain_refuses_what_it_cannot_do(client, query, status, says):
    data, content_type, _ = GOOD["png"]
    answer = client.post(f"/explain?{query}", content=data, headers={"Content-Type": content_type})
    assert answer.status_code == status, answer.text
    assert set(answer.json()) == {"error"} and says in answer.json()["error"]


def test_explain_refuses_a_file_that_is_no_image_as_predict_does(client):
    for route in ("/predict", "/explain"):
        answer = client.post(route, content=b"not an image", headers={"Content-Type": "image/png"})
        assert answer.status_code == 400 and "not an image" in answer.json()["error"]


def as_exported_before_cam(model_dir, folder):
    """A copy of ``model_dir`` as imgclf exported it before cam: no feature map output, no
    head."""
    shutil.copytree(model_dir, folder)
    for name in ("model.onnx", "model.int8.onnx"):
        model = onnx.load(folder / name)
        kept = [o for o in model.graph.output if o.name != "feature_map"]
        del model.graph.output[:]
        model.graph.output.extend(kept)
        onnx.save(model, folder / name)
    (folder / "explanation.npz").unlink()
    metadata = json.loads((folder / "metadata.json").read_text())
    del metadata["explanation"]
    metadata["files"] = file_hashes(folder)
    (folder / "metadata.json").write_text(json.dumps(metadata))
    return folder


def test_a_version_exported_before_cam_keeps_being_explained(tmp_path, published_model):
    """A real server on a version without the feature map: /explain answers by occlusion,
    and method=cam is a 422 that says why and what to do."""
    old = as_exported_before_cam(published_model, tmp_path / "1")
    data, content_type, _ = GOOD["png"]
    headers = {"Content-Type": content_type}
    with Server(old, args=("--workers", "1")) as server, server.client() as http:
        found = http.post("/explain", content=data, headers=headers)
        assert found.status_code == 200 and found.json()["method"] == "occlusion"
        refused = http.post("/explain?method=cam", content=data, headers=headers)
        assert refused.status_code == 422 and set(refused.json()) == {"error"}
        assert "no class-activation graph" in refused.json()["error"]
        assert "export it again" in refused.json()["error"]


def test_imgclf_explain_writes_cam_maps_and_refuses_cam_of_an_older_version(
    tmp_path, published_model
):
    image = tmp_path / "red.png"
    image.write_bytes(png(with_red_in((0, 1))))
    output = tmp_path / "maps"
    done = run_cli("explain", str(image), "--model", str(published_model), "--output", str(output))
    assert done.returncode == 0, done.stderr
    assert "cam map of" in done.stdout
    maps = json.loads((output / "maps.json").read_text())
    assert maps["images"][str(image)]["method"] == "cam"
    old = as_exported_before_cam(published_model, tmp_path / "old" / "1")
    refused = run_cli("explain", str(image), "--model", str(old), "--method", "cam")
    assert_one_line_error(refused, "no class-activation graph", "export it again")


def test_explain_is_counted_under_its_own_endpoint(http):
    """On a real server (metrics need its runtime folder)."""
    data, content_type, _ = GOOD["png"]
    http.post("/explain", content=data, headers={"Content-Type": content_type})
    counted = [
        line
        for line in http.get("/metrics").text.splitlines()
        if line.startswith("imgclf_requests_total{") and 'endpoint="explain"' in line
    ]
    assert any('code="200"' in line and float(line.split()[-1]) >= 1 for line in counted)


def test_covered_copies_are_not_counted_as_predictions(http):
    def answered() -> float:
        return sum(
            float(line.split()[-1])
            for line in http.get("/metrics").text.splitlines()
            if line.startswith("imgclf_batch_size_sum")
        )

    data, content_type, _ = GOOD["png"]
    headers = {"Content-Type": content_type}
    before = answered()
    while True:  # what earlier tests sent, recorded first (the worker flushes once a second)
        time.sleep(1.5)
        previous, before = before, answered()
        if previous == before:
            break
    assert http.post("/explain", content=data, headers=headers).is_success
    assert http.post("/predict", content=data, headers=headers).is_success
    deadline = time.monotonic() + 10
    while answered() < before + 1:  # the worker records batches once a second
        assert time.monotonic() < deadline, "the /predict was never recorded"
        time.sleep(0.2)
    time.sleep(1.5)  # one more flush: anything else recorded shows
    assert answered() == before + 1  # /predict's image alone: none of /explain's 50
