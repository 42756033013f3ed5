"""The ONNX Runtime runtime on a real exported model: providers, hashes, contract checks, top-k."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest

from serving.core.errors import ConfigError, ModelError
from serving.core.model_card import ModelCard
from serving.core.preprocessing import preprocess_file
from serving.core.runtime import ClassifierRuntime
from serving.core.sessions import CPU, CUDA, resolve_session_mode
from training.datasets import read_manifest


@pytest.fixture(scope="module")
def runtime(published_model):
    loaded = ClassifierRuntime(published_model, provider="cpu", max_batch_size=8)
    loaded.warm_up()
    return loaded


def test_runtime_matches_a_plain_onnxruntime_session(runtime, published_model, trained_run):
    test = read_manifest(trained_run)["test"]
    images = np.stack([preprocess_file(s.path, runtime.spec) for s in test])
    plain = ort.InferenceSession(
        str(published_model / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    expected = plain.run(["probabilities"], {"image": images})[0]
    got = runtime.predict(images)  # len(test) > max_batch_size: chunked
    assert len(images) > runtime.max_batch_size
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert runtime.warmed_batch_sizes and runtime.provider == "CPUExecutionProvider"


#: Batch sizes as a loaded adaptive batcher hands them over: a different one almost every time.
MIXED_BATCH_SIZES = (3, 1, 8, 2, 5, 8, 1, 4, 7, 2, 6, 1)


def test_per_bucket_sessions_each_see_one_shape_and_answer_like_one_session(
    published_model, trained_run
):
    """The CUDA remedy, forced on the CPU provider: a run of mixed batch sizes goes through
    one session per bucket, each fixed to its batch size by ONNX Runtime itself."""
    test = read_manifest(trained_run)["test"]
    options = {"provider": "cpu", "max_batch_size": 8}
    shared = ClassifierRuntime(published_model, session_mode="shared", **options)
    per_bucket = ClassifierRuntime(published_model, session_mode="per-bucket", **options)
    images = np.stack([preprocess_file(s.path, shared.spec) for s in test])
    start = 0
    for size in MIXED_BATCH_SIZES:
        batch = images[np.arange(start, start + size) % len(images)]
        start += size
        expected, got = shared.predict(batch), per_bucket.predict(batch)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
        assert (got.argmax(1) == expected.argmax(1)).all()
    # Read back from ONNX Runtime: a session per bucket, each taking one batch size only.
    height, width, channels = shared.spec.input_shape
    fixed = {b: s.get_inputs()[0].shape for b, s in per_bucket.sessions.items()}
    assert fixed == {b: [b, height, width, channels] for b in (1, 2, 4, 8)}
    assert shared.sessions[None].get_inputs()[0].shape[0] == "batch"  # the free dimension
    with pytest.raises(Exception, match="dimensions"):  # ORT refuses a second shape
        per_bucket.sessions[4].run(None, {"image": images[:2]})
    assert per_bucket.runs_by_bucket == shared.runs_by_bucket == {1: 3, 2: 2, 4: 2, 8: 5}
    described = per_bucket.describe()["sessions"]
    assert described["mode"] == "per-bucket" and described["count"] == 4
    assert described["input_shapes"]["4"] == [4, height, width, channels]
    assert shared.describe()["sessions"]["input_shapes"] == {
        "all": ["batch", height, width, channels]
    }


def test_session_mode_auto_is_per_bucket_on_cuda_only(published_model):
    assert resolve_session_mode("auto", CUDA) == "per-bucket"
    assert resolve_session_mode("auto", CPU) == "shared"
    assert resolve_session_mode("per-bucket", CPU) == "per-bucket"
    assert ClassifierRuntime(published_model, provider="cpu").session_mode == "shared"
    with pytest.raises(ConfigError, match="session mode"):
        ClassifierRuntime(published_model, session_mode="one-per-request")


def test_top_k_is_sorted_labelled_and_bounded(runtime):
    probabilities = np.array([[0.1, 0.5, 0.05, 0.3, 0.05], [0.9, 0.02, 0.03, 0.02, 0.03]])
    ranked = runtime.top_k(probabilities, 3)
    assert [r["label"] for r in ranked[0]] == ["1", "3", "0"]
    assert [r["score"] for r in ranked[0]] == [0.5, 0.3, 0.1]
    assert ranked[1][0] == {"label": "0", "score": 0.9}
    assert len(runtime.top_k(probabilities, 99)[0]) == 5


def test_describe_reports_the_provider_and_the_model(runtime, published_model):
    description = runtime.describe()
    metadata = json.loads((published_model / "metadata.json").read_text())
    assert description["execution_provider"] == "CPUExecutionProvider"
    assert (description["name"], description["version"]) == ("tiny", 1)
    assert description["classes"] == metadata["classes"]
    assert description["parity"] == metadata["parity"]


def test_auto_falls_back_to_cpu_and_cuda_is_refused_without_it(published_model, caplog):
    assert "CUDAExecutionProvider" not in ort.get_available_providers()  # CI has no GPU
    auto = ClassifierRuntime(published_model, provider="auto")
    assert auto.provider == "CPUExecutionProvider"
    with pytest.raises(ModelError, match="provider cuda requested"):
        ClassifierRuntime(published_model, provider="cuda")
    with pytest.raises(ConfigError, match="auto, cuda or cpu"):
        ClassifierRuntime(published_model, provider="tpu")


def test_int8_precision_runs_the_int8_file(published_model):
    if not (published_model / "model.int8.onnx").exists():
        with pytest.raises(ModelError, match="INT8 was not exported or not kept"):
            ClassifierRuntime(published_model, precision="int8")
        return
    runtime = ClassifierRuntime(published_model, precision="int8")
    assert runtime.predict(np.zeros((2, *runtime.spec.input_shape), np.float32)).shape == (2, 5)


def copy_model(source, target):
    shutil.copytree(source, target)
    return target


def test_tampered_model_file_is_refused(tmp_path, published_model):
    model_dir = copy_model(published_model, tmp_path / "m")
    data = bytearray((model_dir / "model.onnx").read_bytes())
    data[-10] ^= 0xFF
    (model_dir / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not match its hash"):
        ClassifierRuntime(model_dir)


def test_metadata_contradicting_the_graph_is_refused(tmp_path, published_model):
    model_dir = copy_model(published_model, tmp_path / "m")
    metadata = json.loads((model_dir / "metadata.json").read_text())
    metadata["preprocessing"]["height"] = 24
    (model_dir / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelError, match=r"says input \(24, 16, 3\) but the ONNX graph takes"):
        ClassifierRuntime(model_dir)
    metadata["preprocessing"]["height"] = 16
    metadata["classes"] = metadata["classes"][:3]
    (model_dir / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelError, match="lists 3 classes but the graph outputs 5"):
        ClassifierRuntime(model_dir)


def test_missing_and_corrupt_models_are_clear_errors(tmp_path, published_model):
    with pytest.raises(ModelError, match="does not exist"):
        ClassifierRuntime(tmp_path / "nowhere")
    model_dir = copy_model(published_model, tmp_path / "m")
    (model_dir / "model.onnx").write_bytes(b"not onnx at all")
    metadata = json.loads((model_dir / "metadata.json").read_text())
    import hashlib

    metadata["files"]["model.onnx"] = hashlib.sha256(b"not onnx at all").hexdigest()
    (model_dir / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ModelError, match="ONNX Runtime cannot load the model"):
        ClassifierRuntime(model_dir)


def test_repository_path_resolves_to_the_newest_version(tmp_path, published_model):
    repository = tmp_path / "repo" / "tiny"
    copy_model(published_model, repository / "1")
    newer = copy_model(published_model, repository / "3")
    metadata = json.loads((newer / "metadata.json").read_text())
    metadata["version"] = 3
    (newer / "metadata.json").write_text(json.dumps(metadata))
    assert ModelCard(repository).version == 3


def test_serving_path_never_imports_tensorflow(published_model):
    code = (
        "import os, sys; os.environ['IMGCLF_MODEL_DIR'] = sys.argv[1]\n"
        "import serving.service, serving.core.runtime, serving.web.context, monitoring\n"
        "print(sorted(m for m in ('tensorflow', 'keras', 'tf2onnx') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(published_model)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_runtime_follows_the_contract_each_model_was_exported_with(
    published_model, trained_run, tmp_path
):
    """A model exported before the JPEG draft step (no ``jpeg_draft_margin`` in its metadata)
    decodes at full size, exactly as Pillow did before; a new export, trained with the same
    step (no skew between training and serving), decodes large JPEGs at a reduced scale."""
    from PIL import Image, ImageOps
    from sklearn.datasets import load_sample_image

    buffer = io.BytesIO()
    Image.fromarray(load_sample_image("flower.jpg")).resize((1600, 1200)).save(
        buffer, "JPEG", quality=92
    )
    data = buffer.getvalue()
    trained = json.loads((trained_run / "run.json").read_text())["preprocessing"]
    exported = json.loads((published_model / "metadata.json").read_text())["preprocessing"]
    assert trained["jpeg_draft_margin"] == exported["jpeg_draft_margin"] == 2.0
    assert exported["contract_version"] == 2

    old = tmp_path / "old"
    shutil.copytree(published_model, old)
    metadata = json.loads((old / "metadata.json").read_text())
    for key in ("jpeg_draft_margin", "contract_version"):
        metadata["preprocessing"].pop(key)
    (old / "metadata.json").write_text(json.dumps(metadata))
    before, now = ClassifierRuntime(old, provider="cpu"), ClassifierRuntime(published_model)

    height, width, _ = before.spec.input_shape
    with Image.open(io.BytesIO(data)) as image:  # the contract as written before the step
        upright = ImageOps.exif_transpose(image).convert("RGB")
        expected = np.asarray(upright.resize((width, height), Image.BILINEAR), np.float32)
    assert np.array_equal(before.preprocess(data), expected)
    assert np.array_equal(
        before.predict(before.preprocess(data)[None]), before.predict(expected[None])
    )
    reduced = now.preprocess(data)
    assert not np.array_equal(reduced, expected)
    assert np.abs(reduced - expected).mean() < 1.0
