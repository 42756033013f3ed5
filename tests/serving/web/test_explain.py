"""``POST /explain`` and ``serving.core.explain``: the map is right where the answer is known
(a hand-built red detector, the evidence in each quadrant in turn), it depends on the
evidence (deleting pixels in map order costs the class faster than at random, on held-out
digits), and the route answers as ``/predict`` does: the same label, the same errors."""

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

from serving.core.explain import GRID, cells, explain_offline, occlusion_images
from serving.core.runtime import ClassifierRuntime
from tests.serving.cases import good_images
from training.datasets import read_manifest

GOOD = good_images()
SIZE = 28  # a multiple of nothing in particular: cells of 4 pixels
CELL = SIZE // GRID


def red_detector(folder, published_model) -> ClassifierRuntime:
    """No training: a 1x1 convolution that answers how red a pixel is (R minus the mean of G
    and B, over 255), ReLU, the mean over the image, and a Dense layer to "red" and "not
    red": the evidence for "red" is where the red pixels are, and nowhere else."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", SIZE, SIZE, 3])
    output = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])
    weights = {
        "redness": np.array([1.0, -0.5, -0.5], np.float32).reshape(1, 3, 1, 1) / 255,
        # Not saturated: covering a quarter of the red square moves "red" from 0.88 to 0.62.
        "dense": np.array([[90.0, 0.0]], np.float32),
        "bias": np.array([0.0, 4.0], np.float32),
    }
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
    data = model.SerializeToString()
    (folder / "model.onnx").write_bytes(data)
    metadata = json.loads((published_model / "metadata.json").read_text())
    contract = metadata["preprocessing"] | {"height": SIZE, "width": SIZE}
    metadata.update(
        name="red",
        version=1,
        classes=["red", "not red"],
        input=metadata["input"] | {"height": SIZE, "width": SIZE},
        preprocessing=contract,
        files={"model.onnx": hashlib.sha256(data).hexdigest()},
    )
    (folder / "metadata.json").write_text(json.dumps(metadata))
    return ClassifierRuntime(folder, provider="cpu")


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
    return red_detector(tmp_path_factory.mktemp("red") / "1", published_model)


@pytest.mark.parametrize("quadrant", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_the_map_lies_where_the_evidence_is(detector, quadrant):
    image = detector.preprocess(png(with_red_in(quadrant)))
    found = explain_offline(detector, image, "red")
    assert found["label"] == "red" and found["class"] == "red"
    heat = found["map"]
    # The quadrant's cells (the middle row and column of an odd grid are shared: left out).
    half = GRID // 2
    rows = slice(0, half) if quadrant[0] == 0 else slice(half + 1, GRID)
    columns = slice(0, half) if quadrant[1] == 0 else slice(half + 1, GRID)
    inside = np.zeros_like(heat, dtype=bool)
    inside[rows, columns] = True
    top = np.unravel_index(np.argmax(heat), heat.shape)
    assert inside[top], (quadrant, np.round(heat, 2))
    assert heat[inside].sum() >= 0.8 * heat.sum(), np.round(heat, 2)


def test_a_map_for_the_other_class_is_not_the_same(detector):
    """Covering the red square lowers "red" and raises "not red": the cells that hold the
    whole evidence for one class hold none for the other."""
    image = detector.preprocess(png(with_red_in((0, 0))))
    red = explain_offline(detector, image, "red")["map"]
    not_red = explain_offline(detector, image, "not red")["map"]
    square = (slice(1, 3), slice(1, 3))  # the cells the red square fills
    assert red[square].min() > 0.5 and (not_red[square] == 0).all()


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


def test_deleting_pixels_in_map_order_costs_the_class_faster_than_at_random(
    digits_model, test_split
):
    """The deletion check (Petsiuk et al., 2018) on 40 held-out digits: cells removed most
    salient first lower the predicted class's probability more than the same cells removed
    in random order."""
    runtime = ClassifierRuntime(digits_model, provider="cpu")
    rng = np.random.default_rng(0)
    by_map, at_random = [], []
    for picture, _ in test_split[:40]:
        image = runtime.preprocess(png(np.asarray(picture.convert("RGB"), np.float32)))
        found = explain_offline(runtime, image)
        index = runtime.classes.index(found["class"])
        salient_first = np.argsort(-found["map"].reshape(-1), kind="stable")
        by_map.append(deletion_cost(runtime, image, index, salient_first))
        at_random.append(deletion_cost(runtime, image, index, rng.permutation(GRID * GRID)))
    assert np.mean(by_map) < np.mean(at_random), (np.mean(by_map), np.mean(at_random))


def with_last_layer_shuffled(model_dir, folder) -> ClassifierRuntime:
    """A copy of ``model_dir`` whose last Dense kernel (the one feeding the softmax) has its
    rows shuffled: the same features, wired to the classes at random."""
    shutil.copytree(model_dir, folder)
    model = onnx.load(folder / "model.onnx")
    nodes = {output: node for node in model.graph.node for output in node.output}
    softmax = next(node for node in model.graph.node if node.op_type == "Softmax")
    node = nodes[softmax.input[0]]
    while node.op_type not in ("MatMul", "Gemm"):
        node = nodes[node.input[0]]
    kernel = next(i for i in model.graph.initializer if i.name == node.input[1])
    rows = numpy_helper.to_array(kernel)
    shuffled = rows[np.random.default_rng(0).permutation(len(rows))]
    kernel.CopyFrom(numpy_helper.from_array(shuffled, kernel.name))
    data = model.SerializeToString()
    (folder / "model.onnx").write_bytes(data)
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata["files"]["model.onnx"] = hashlib.sha256(data).hexdigest()
    (folder / "metadata.json").write_text(json.dumps(metadata))
    return ClassifierRuntime(folder, provider="cpu")


def test_the_map_depends_on_the_model(digits_model, digits_run, tmp_path):
    """The model randomisation check (Adebayo et al., 2018): with the last layer's rows
    shuffled, the maps of the same images and classes no longer rank the cells alike
    (mean Spearman correlation below 0.3, on 40 held-out digits)."""
    trained = ClassifierRuntime(digits_model, provider="cpu")
    shuffled = with_last_layer_shuffled(digits_model, tmp_path / "1")
    correlations = []
    for sample in read_manifest(digits_run)["test"][:40]:
        image = trained.preprocess(sample.path.read_bytes())
        mine = explain_offline(trained, image)
        theirs = explain_offline(shuffled, image, mine["class"])
        rho = spearmanr(mine["map"].ravel(), theirs["map"].ravel()).statistic
        correlations.append(0.0 if np.isnan(rho) else rho)
    assert np.mean(correlations) < 0.3, np.mean(correlations)


# The route, in-process (the test server's model).


def test_explain_answers_the_predicted_label_with_a_map(client):
    data, content_type, _ = GOOD["png"]
    predicted = client.post("/predict", content=data, headers={"Content-Type": content_type})
    answer = client.post("/explain", content=data, headers={"Content-Type": content_type})
    assert answer.status_code == 200, answer.text
    found = answer.json()
    assert set(found) == {"label", "score", "class", "method", "map", "model_version", "request_id"}
    assert found["label"] == found["class"] == predicted.json()["label"]
    assert found["score"] == pytest.approx(predicted.json()["score"], rel=1e-5)
    heat = np.asarray(found["map"])
    assert heat.shape == (GRID, GRID) and heat.min() >= 0 and heat.max() == 1.0
    assert found["method"] == "occlusion" and found["model_version"] == 1
    assert answer.headers["x-request-id"] == found["request_id"]


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
        ("method=cam", 422, "explanation graph"),
        ("method=lime", 400, "method must be"),
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
