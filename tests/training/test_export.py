"""The converter: SavedModel + ONNX, the parity gate, INT8, atomic publishing, versions."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from serving.core.errors import ConfigError, ModelError  # noqa: E402
from serving.core.model_dir import load_metadata, verify_files, version_numbers  # noqa: E402
from tests.conftest import (  # noqa: E402
    IMGCLF,
    REPO,
    TF_NATIVE_LINES,
    assert_one_line_error,
    assert_refused_before_tensorflow_loads,
    run_cli,
)
from training import export as export_module  # noqa: E402
from training import parity  # noqa: E402
from training.datasets import read_manifest  # noqa: E402
from training.export import export  # noqa: E402


def test_published_version_is_complete_and_self_describing(published_model, trained_run):
    names = {p.name for p in published_model.iterdir()}
    assert {"saved_model", "model.onnx", "metadata.json", "parity.json"} <= names
    metadata = load_metadata(published_model)
    run_info = json.loads((trained_run / "run.json").read_text())
    metrics = json.loads((trained_run / "metrics.json").read_text())

    assert (metadata["name"], metadata["version"]) == ("tiny", 1)
    assert metadata["classes"] == run_info["classes"] == ["0", "1", "2", "3", "4"]
    assert metadata["input"] == {
        "name": "image",
        "height": 16,
        "width": 16,
        "channels": 3,
        "layout": "NHWC",
        "dtype": "float32",
    }
    pre = metadata["preprocessing"]
    assert (pre["resize_filter"], pre["value_range"], pre["color"]) == (
        "bilinear",
        [0.0, 255.0],
        "RGB",
    )
    assert "Rescaling" in pre["graph_does"]
    assert metadata["metrics"]["accuracy"] == metrics["test"]["accuracy"]
    assert set(metadata["versions"]) == {"tensorflow", "keras", "tf2onnx", "onnx", "onnxruntime"}
    assert metadata["opset"] == 17
    # Every file is hashed, and the hashes are true.
    on_disk = {
        p.relative_to(published_model).as_posix()
        for p in published_model.rglob("*")
        if p.is_file() and p.name != "metadata.json"
    }
    assert set(metadata["files"]) == on_disk
    assert any(name.startswith("saved_model/") for name in on_disk)
    verify_files(published_model, metadata)


def test_onnx_graph_contract_and_metadata_props(published_model):
    model = onnx.load(str(published_model / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [17]
    (graph_input,) = model.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert graph_input.name == "image"
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [16, 16, 3]
    # The probabilities first, the penultimate features for embedding drift, and the last
    # feature map for /explain's cam.
    assert [o.name for o in model.graph.output] == ["probabilities", "embedding", "feature_map"]
    metadata = load_metadata(published_model)
    props = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert set(props) == set(metadata)
    for key in metadata:
        if key != "files":
            assert props[key] == metadata[key], key


def test_saved_model_signature(published_model):
    loaded = tf.saved_model.load(str(published_model / "saved_model"))
    signature = loaded.signatures["serving_default"]
    _, inputs = signature.structured_input_signature
    assert list(inputs) == ["image"]
    assert inputs["image"].shape.as_list() == [None, 16, 16, 3]
    assert sorted(signature.structured_outputs) == ["embedding", "feature_map", "probabilities"]


def test_parity_report_meets_the_gate(published_model):
    report = json.loads((published_model / "parity.json").read_text())
    assert report["passed"] is True and report["reference"] == "keras"
    assert report["batch_sizes"][:2] == [1, 7] and report["batch_sizes"][-1] == report["images"]
    for runtime in ("savedmodel", "onnx"):
        assert report["summary"][runtime]["max_abs_diff"] <= 1e-5
        assert report["summary"][runtime]["top1_agreement"] == 1.0
    assert len(report["checks"]) == 2 * len(report["batch_sizes"])
    # Batch size 1 on the first images only, the other sizes on all of them.
    one = [c["images"] for c in report["checks"] if c["batch_size"] == 1]
    assert one == [min(parity.BATCH_ONE_IMAGES, report["images"])] * 2
    assert {c["images"] for c in report["checks"] if c["batch_size"] > 1} == {report["images"]}
    # The embedding output is gated too, relative to its largest feature.
    embedding = report["embedding"]
    assert embedding["passed"] is True and embedding["largest_feature"] > 0
    assert embedding["max_abs_diff"] <= 1e-4 * embedding["largest_feature"]


def test_the_embedding_gate_refuses_features_that_differ(published_model):
    """A graph whose second output drifted from Keras' features publishes nothing."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (8, 16, 16, 3)).astype(np.float32)
    good = parity.onnx_predictor(published_model / "model.onnx", output="embedding")
    with pytest.raises(parity.ParityError, match="embedding output differs"):
        parity.check_embedding_parity(good, lambda batch: good(batch) * 1.01, images, batch_size=8)


def test_int8_gate_is_recorded_and_obeyed(published_model):
    report = json.loads((published_model / "parity.json").read_text())["int8"]
    assert (report["format"], report["per_channel"], report["weight_type"]) == ("QDQ", True, "int8")
    assert report["calibration_images"] > 0
    drop = report["fp32_test_accuracy"] - report["int8_test_accuracy"]
    assert report["kept"] == (drop <= 0.01 + 1e-12)
    int8_path = published_model / "model.int8.onnx"
    assert int8_path.exists() == report["kept"]
    if report["kept"]:
        model = onnx.load(str(int8_path))
        assert any(node.op_type == "QuantizeLinear" for node in model.graph.node)
        session = ort.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
        batch = np.zeros((2, 16, 16, 3), dtype=np.float32)
        assert session.run(["probabilities"], {"image": batch})[0].shape == (2, 5)


def test_onnx_model_runs_with_onnxruntime_alone(published_model, trained_run):
    """A fresh process with no TensorFlow: the published model and the shared preprocessing."""
    code = f"""
import json, sys
import numpy as np, onnxruntime as ort
from serving.core.preprocessing import PreprocessSpec, preprocess_file
from serving.core.model_dir import load_metadata
from training.datasets import read_manifest
meta = load_metadata({str(published_model)!r})
spec = PreprocessSpec.from_metadata(meta["preprocessing"])
test = read_manifest({str(trained_run)!r})["test"]
images = np.stack([preprocess_file(s.path, spec) for s in test])
session = ort.InferenceSession({str(published_model / "model.onnx")!r},
                               providers=["CPUExecutionProvider"])
probabilities = session.run(["probabilities"], {{"image": images}})[0]
accuracy = float((probabilities.argmax(1) == [meta["classes"].index(s.label) for s in test]).mean())
print(json.dumps({{"tf": "tensorflow" in sys.modules, "accuracy": accuracy}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tf"] is False
    expected = json.loads((trained_run / "metrics.json").read_text())["test"]["accuracy"]
    assert result["accuracy"] == pytest.approx(expected)


def test_versions_are_numbered_like_tf_serving(tmp_path):
    """What ``imgclf export`` does around the conversion (``training/publish.py``), with a
    one-file stand-in for the model: the next free number, or the one asked for, refused
    when taken unless forced, staging folders never left behind."""
    from training.publish import destination, new_staging, publish

    run, repository = tmp_path / "m", tmp_path / "repo"
    written = []

    def export_stand_in(version=None, force=False, name="m"):
        name, model_root, number = destination(run, repository, name, version, force=force)
        staging = new_staging(model_root, number)
        written.append(f"export {len(written)}")
        (staging / "metadata.json").write_text(written[-1])
        return publish(staging, model_root, number, force=force)

    assert [export_stand_in().name, export_stand_in().name] == ["1", "2"]
    assert export_stand_in(version=5).name == "5"
    assert export_stand_in().name == "6"
    assert version_numbers(repository / "m") == [1, 2, 5, 6]
    with pytest.raises(ConfigError, match="already exists"):
        export_stand_in(version=2)
    assert export_stand_in(version=2, force=True).name == "2"
    assert (repository / "m" / "2" / "metadata.json").read_text() == written[-1]
    assert not [p for p in (repository / "m").iterdir() if p.name.startswith(".")]
    with pytest.raises(ConfigError, match="model name"):
        export_stand_in(name="Bad Name")


def corrupt_first_weight(path) -> None:
    model = onnx.load(str(path))
    biggest = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    weights = np.frombuffer(biggest.raw_data, dtype=np.float32).copy()
    weights *= -3.0
    biggest.raw_data = weights.tobytes()
    onnx.save(model, str(path))


def test_parity_gate_refuses_a_corrupted_onnx_weight(tmp_path, published_model, trained_run):
    corrupted = tmp_path / "corrupted.onnx"
    corrupted.write_bytes((published_model / "model.onnx").read_bytes())
    corrupt_first_weight(corrupted)
    good = parity.onnx_predictor(published_model / "model.onnx")
    images = np.random.default_rng(0).uniform(0, 255, (9, 16, 16, 3)).astype(np.float32)
    with pytest.raises(parity.ParityError, match=r"onnx at batch size 1 differs"):
        parity.check_parity(
            good, {"onnx": parity.onnx_predictor(corrupted)}, images, max_batch_size=64
        )


def test_failed_gate_publishes_nothing(tmp_path, trained_run, monkeypatch):
    """The exporter's own ONNX step is made to write a disagreeing model."""
    real_write_onnx = export_module.write_onnx

    def write_corrupted(serve, input_shape, path):
        real_write_onnx(serve, input_shape, path)
        corrupt_first_weight(path)

    monkeypatch.setattr(export_module, "write_onnx", write_corrupted)
    repository = tmp_path / "repo"
    with pytest.raises(parity.ParityError, match="nothing was published"):
        export(trained_run, repository, name="m")
    assert list((repository / "m").iterdir()) == []


def test_killed_export_leaves_no_version(tmp_path, trained_run):
    repository = tmp_path / "repo"
    process = subprocess.Popen(
        [
            IMGCLF,
            "export",
            str(trained_run),
            "--repository",
            str(repository),
            "--name",
            "m",
            "--no-register",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    staging = []
    while time.time() < deadline and process.poll() is None:
        staging = list((repository / "m").glob(".staging-*/saved_model/saved_model.pb"))
        if staging:
            break
        time.sleep(0.02)
    assert staging, "the export finished or failed before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert version_numbers(repository / "m") == []

    again = run_cli(
        "export", str(trained_run), "--repository", str(repository), "--name", "m", "--no-register"
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert version_numbers(repository / "m") == [1]
    assert not list((repository / "m").glob(".staging-*")), "stale staging was not cleaned"


def test_missing_or_corrupt_checkpoint_is_one_line(tmp_path, trained_run):
    assert_one_line_error(run_cli("export", str(tmp_path / "nope")), "does not exist")
    broken = tmp_path / "broken_run"
    broken.mkdir()
    for name in ("run.json", "metrics.json", "manifest.csv", "config.yaml"):
        (broken / name).write_bytes((trained_run / name).read_bytes())
    assert_refused_before_tensorflow_loads(
        ["export", str(broken), "--repository", str(tmp_path / "r")], "best.keras does not exist"
    )
    (broken / "best.keras").write_bytes(b"PK\x03\x04 this is not a keras archive")
    # With --verbose and TensorFlow's log level at its default: still one error line, and
    # TensorFlow's native start-up lines shown (hidden without --verbose; the oneDNN line
    # only on CPUs where TensorFlow turns oneDNN on).
    corrupt = run_cli(
        *("--verbose", "export", str(broken), "--repository", str(tmp_path / "r")),
        env={"TF_CPP_MIN_LOG_LEVEL": "0"},
    )
    assert_one_line_error(corrupt, "cannot load", "best.keras")
    assert any(line in corrupt.stderr for line in TF_NATIVE_LINES)
    assert not (tmp_path / "r" / "broken_run").exists() or not version_numbers(
        tmp_path / "r" / "broken_run"
    )


def test_register_copies_the_directory_into_the_bentoml_store(published_model):
    import bentoml

    from serving.registry import register

    tag = register(published_model)
    assert tag == "tiny:1"
    stored = bentoml.models.get(tag)
    metadata = load_metadata(published_model)
    verify_files(stored.path, metadata)
    assert stored.info.labels["framework"] == "onnx"
    assert stored.info.metadata["classes"] == metadata["classes"]
    assert register(published_model) == tag  # idempotent for the same bytes


def test_register_refuses_a_tampered_directory(tmp_path, published_model):
    import shutil

    from serving.registry import register

    copy = tmp_path / "copy"
    shutil.copytree(published_model, copy)
    with (copy / "model.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelError, match="does not match its hash"):
        register(copy)


def test_scale_fold_is_exact_and_skips_negative_scales(tmp_path, published_model):
    from onnx import numpy_helper

    from training.quantize import fold_positive_scales

    original = onnx.load(str(published_model / "model.onnx"))
    folded = onnx.load(str(published_model / "model.onnx"))
    # 2 of the 3 conv BNs after ReLU, and the 2 dense BNs before it: the last convolution's
    # ReLU is also the graph's feature_map output, which a fold would scale, so it stays.
    assert fold_positive_scales(folded) == 4
    left = [n.name for n in folded.graph.node if n.op_type == "Mul" and "batchnorm" in n.name]
    assert len(left) == 1 and "bn128" in left[0], left
    images = np.random.default_rng(3).uniform(0, 255, (16, 16, 16, 3)).astype(np.float32)

    def run(model):
        path = tmp_path / "m.onnx"
        onnx.save(model, str(path))
        return parity.onnx_predictor(path)(images)

    np.testing.assert_allclose(run(folded), run(original), rtol=1e-4, atol=1e-6)

    negative = onnx.load(str(published_model / "model.onnx"))
    mul = next(n for n in negative.graph.node if n.op_type == "Mul" and "bn32" in n.name)
    scale_name = next(
        name for name in mul.input if name in {t.name for t in negative.graph.initializer}
    )
    tensor = next(t for t in negative.graph.initializer if t.name == scale_name)
    values = numpy_helper.to_array(tensor).copy()
    values.flat[0] = -abs(values.flat[0])
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    reference = run(negative)
    assert fold_positive_scales(negative) == 3  # the conv BN with a negative scale stays too
    np.testing.assert_allclose(run(negative), reference, rtol=1e-4, atol=1e-6)


def test_int8_keeps_the_softmax_in_float_so_probabilities_sum_to_one(
    tmp_path, published_model, trained_run
):
    """Quantized whole, the softmax gave probabilities in steps of 1/255 that did not sum to
    1, and every class after the first tied at 0.0; its head now stays in float."""
    from serving.core.preprocessing import PreprocessSpec, preprocess_file
    from training import quantize

    spec = PreprocessSpec.from_metadata(load_metadata(published_model)["preprocessing"])
    test = read_manifest(trained_run)["test"]
    images = np.stack([preprocess_file(s.path, spec) for s in test])
    int8_path = tmp_path / "model.int8.onnx"
    settings = quantize.quantize(published_model / "model.onnx", int8_path, images)
    model = onnx.load(str(int8_path))
    head = {
        node.name: node.op_type for node in model.graph.node if node.name in settings["float_nodes"]
    }
    assert "Softmax" in head.values() and {"MatMul", "Gemm"} & set(head.values()), head
    assert not any(
        node.op_type == "QuantizeLinear" and "probabilities" in node.input
        for node in model.graph.node
    )

    def run(path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(["probabilities"], {"image": images})[0]

    fp32, int8 = run(published_model / "model.onnx"), run(int8_path)
    check = quantize.output_check(fp32, int8)
    assert check["sums_to_one"] and check["max_sum_error"] < 1e-5
    second = np.sort(int8, axis=1)[:, -2]
    assert (second > 0).all(), "the runner-up is a real probability, not a quantized 0"
    report = json.loads((published_model / "parity.json").read_text())["int8"]
    assert report["sums_to_one"] and "max_abs_diff" in report  # the export checked the vector
