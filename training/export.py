"""``imgclf export``: a training run's best checkpoint -> a published, versioned model directory.

Everything is built in a hidden staging folder next to the destination (same file system),
checked (ONNX checker, parity gate, INT8 accuracy gate), hashed, fsynced and only then renamed
into ``repository/<name>/<version>``. A crash or a failed gate leaves no version behind.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import onnx
import tensorflow as tf
import tf2onnx

import training.augmentation
import training.models  # noqa: F401  (registers BackbonePreprocess for load_model)
from monitoring import embedding as embedding_drift
from monitoring.drift import build_reference_profile, image_signals
from monitoring.estimate import fit_calibration
from monitoring.performance import held_out_performance
from serving.core.errors import ModelError
from serving.core.files import write_json
from serving.core.model_dir import (
    CALIBRATION,
    EMBEDDING_NAME,
    EMBEDDING_REFERENCE,
    EXPLANATION_HEAD,
    FEATURE_MAP_NAME,
    INPUT_NAME,
    INT8_MODEL,
    METADATA,
    ONNX_MODEL,
    OUTPUT_NAME,
    PARITY,
    REFERENCE_PROFILE,
    SAVED_MODEL,
    file_hashes,
)
from serving.core.preprocessing import PreprocessSpec, preprocess_file
from training import datasets, explanation, parity, quantize
from training.publish import check_learned, destination, new_staging, publish
from training.run_dir import BEST_MODEL, check_checkpoint

log = logging.getLogger(__name__)

OPSET = 17


@dataclass
class ExportResult:
    path: Path
    name: str
    version: int
    parity: dict
    int8: dict | None


def export(
    run_dir: Path,
    repository: Path,
    *,
    name: str | None = None,
    version: int | None = None,
    int8: bool = False,
    int8_activation_type: str | None = None,
    force: bool = False,
    max_batch_size: int = 64,
    parity_images: int = 512,
    profile_images: int = 5000,
    taken_versions: Callable[[str], set[int]] | None = None,
    allow_unlearned: bool = False,
) -> ExportResult:
    """Convert, check and publish; raises ``ImgclfError`` (nothing published) on any failure,
    and for a run that did not learn unless ``allow_unlearned``."""
    run_dir = Path(run_dir)
    run_info = datasets.read_run(run_dir)
    check_learned(run_dir, allow_unlearned=allow_unlearned)
    model = load_checkpoint(run_dir / BEST_MODEL)
    spec = PreprocessSpec.from_metadata(run_info["preprocessing"])
    classes = run_info["classes"]
    splits = datasets.read_manifest(run_dir)

    name, model_root, version = destination(
        run_dir, repository, name, version, force=force, taken_versions=taken_versions
    )
    staging = new_staging(model_root, version)
    try:
        split = explanation.split_model(model)
        if split is None:
            log.warning("no feature map to explain in %s: /explain offers occlusion only", run_dir)
        features = explanation.features_model(model, split)
        serve = serving_function(features, spec.input_shape)
        write_saved_model(model, serve, staging / SAVED_MODEL)
        write_onnx(serve, spec.input_shape, staging / ONNX_MODEL)

        test_images, test_labels = load_split(splits["test"], classes, spec, limit=parity_images)
        report = parity.check_parity(
            reference=lambda batch: features(batch, training=False)[0].numpy(),
            candidates={
                "savedmodel": _saved_model_predictor(staging / SAVED_MODEL),
                "onnx": parity.onnx_predictor(staging / ONNX_MODEL),
            },
            images=test_images,
            max_batch_size=max_batch_size,
        )
        report["embedding"] = parity.check_embedding_parity(
            lambda batch: features(batch, training=False)[1].numpy(),
            parity.onnx_predictor(staging / ONNX_MODEL, output=EMBEDDING_NAME),
            test_images,
            batch_size=max_batch_size,
        )
        if split is not None:
            report["explanation"] = write_explanation_head(
                split, features, staging, test_images[:EXPLAINED_IMAGES]
            )
        int8_report = None
        if int8:
            calibration, _ = load_split(splits["validation"], classes, spec, limit=512)
            int8_report = _quantize_and_gate(
                staging, calibration, test_images, test_labels, int8_activation_type
            )
            report["int8"] = int8_report
        write_json(staging / PARITY, report)
        write_monitoring_reference(staging, splits, classes, spec, run_dir, profile_images)

        metadata = build_metadata(name, version, run_dir, run_info, spec, report, int8_report)
        if split is not None:
            metadata["explanation"] = {
                "method": report["explanation"]["method"],
                "output": FEATURE_MAP_NAME,
                **split.describe(features.outputs[2].shape[1:]),
                "file": EXPLANATION_HEAD,
            }
        for onnx_file in (ONNX_MODEL, INT8_MODEL):
            if (staging / onnx_file).exists():
                set_onnx_metadata(staging / onnx_file, metadata)
        metadata["files"] = file_hashes(staging)
        write_json(staging / METADATA, metadata)
        published = publish(staging, model_root, version, force=force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(published, name, version, report, int8_report)


def load_checkpoint(path: Path) -> keras.Model:
    """Load ``best.keras`` with safe_mode on; a missing or corrupt file is one clear error."""
    path = check_checkpoint(path)
    try:
        return keras.saving.load_model(path, safe_mode=True, compile=False)
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ModelError(f"cannot load {path}: corrupt or not a Keras model ({first})") from error


def serving_function(features: keras.Model, input_shape: tuple[int, int, int]):
    """The inference graph: float32 NHWC ``image`` -> ``{"probabilities", "embedding"}`` and,
    where the model has one to explain, ``"feature_map"`` (``explanation.features_model``)."""
    signature = tf.TensorSpec((None, *input_shape), tf.float32, name=INPUT_NAME)
    names = (OUTPUT_NAME, EMBEDDING_NAME, FEATURE_MAP_NAME)[: len(features.outputs)]

    @tf.function(input_signature=[signature])
    def serve(image):
        return dict(zip(names, features(image, training=False), strict=True))

    return serve


#: Held-out images the cam gate compares TensorFlow's maps with NumPy's on.
EXPLAINED_IMAGES = 64


def write_explanation_head(
    split: explanation.Split, features: keras.Model, staging: Path, images: np.ndarray
) -> dict:
    """The head after the feature map as ``explanation.npz``, once the gate
    (``explanation.check_cam_parity``) has passed on the staged ONNX graph; the report."""
    import onnxruntime

    session = onnxruntime.InferenceSession(
        str(staging / ONNX_MODEL), providers=["CPUExecutionProvider"]
    )
    outputs = session.run([OUTPUT_NAME, FEATURE_MAP_NAME], {INPUT_NAME: images})
    head = explanation.head_of(split)
    report = explanation.check_cam_parity(split, features, head, tuple(outputs), images)
    (staging / EXPLANATION_HEAD).write_bytes(head.to_bytes())
    return report


def write_saved_model(model: keras.Model, serve, path: Path) -> None:
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve)
    archive.write_out(str(path), verbose=False)


def write_onnx(serve, input_shape: tuple[int, int, int], path: Path) -> None:
    signature = tf.TensorSpec((None, *input_shape), tf.float32, name=INPUT_NAME)
    model_proto, _ = tf2onnx.convert.from_function(serve, input_signature=[signature], opset=OPSET)
    # tf2onnx names the dynamic dimension unk__N; call it what it is.
    for value in (*model_proto.graph.input, *model_proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    # The probabilities first (tf2onnx sorts a dict's outputs by name), for any tool that
    # runs ``session.run(None, ...)[0]``.
    order = (OUTPUT_NAME, EMBEDDING_NAME, FEATURE_MAP_NAME)
    outputs = sorted(model_proto.graph.output, key=lambda o: order.index(o.name))
    outputs = [type(o).FromString(o.SerializeToString()) for o in outputs]
    del model_proto.graph.output[:]
    model_proto.graph.output.extend(outputs)
    onnx.save(model_proto, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as error:
        raise ModelError(f"the converted ONNX model is invalid: {str(error)[:300]}") from error
    names = (
        [i.name for i in model_proto.graph.input],
        [o.name for o in model_proto.graph.output],
    )
    if names not in (
        ([INPUT_NAME], [OUTPUT_NAME, EMBEDDING_NAME]),
        ([INPUT_NAME], [OUTPUT_NAME, EMBEDDING_NAME, FEATURE_MAP_NAME]),
    ):
        raise ModelError(f"the converted ONNX model has inputs/outputs {names}")


def set_onnx_metadata(path: Path, metadata: dict) -> None:
    """Copy metadata.json's keys into ``metadata_props`` (values JSON-encoded). ``files`` holds
    a pointer, not the hashes: a file cannot carry its own hash."""
    model_proto = onnx.load(str(path))
    del model_proto.metadata_props[:]
    for key, value in metadata.items():
        entry = model_proto.metadata_props.add()
        entry.key = key
        entry.value = json.dumps(value if key != "files" else f"sha256 of every file: {METADATA}")
    model_proto.doc_string = f"imgclf {metadata['name']} v{metadata['version']}"
    onnx.save(model_proto, str(path))


def write_monitoring_reference(staging, splits, classes, spec, run_dir, limit: int) -> None:
    """What monitoring compares live traffic with, from the validation split only, scored
    by the exported model exactly as the service will score it: the reference profile (with
    its calibrated drift thresholds and held-out performance), the temperature of the
    label-free estimate, and the embedding reference. The test split stays out of all of
    them, so that it can check them: ``imgclf`` traffic is never the reference itself."""
    images, labels = load_split(splits["validation"], classes, spec, limit=limit)
    probabilities = parity.run_batched(parity.onnx_predictor(staging / ONNX_MODEL), images, 256)
    embeddings = parity.run_batched(
        parity.onnx_predictor(staging / ONNX_MODEL, output=EMBEDDING_NAME), images, 256
    )
    source = f"{len(images)} validation images of {Path(run_dir).resolve()}"
    profile = build_reference_profile(
        image_signals(images, probabilities),
        classes,
        source=source,
        performance=held_out_performance(labels, probabilities),
    )
    reference = embedding_drift.EmbeddingReference.fit(embeddings)
    reference.save(staging / EMBEDDING_REFERENCE)
    profile["embedding"] = {
        "file": EMBEDDING_REFERENCE,
        "samples": len(reference.reference),
        "features": int(embeddings.shape[1]),
        "components": int(reference.components.shape[0]),
        "support_radius": reference.support_radius,
        # The same family-wise quantiles as the other statistics (the embedding's included).
        "thresholds": embedding_drift.calibrate(
            reference.reference, profile["thresholds"]["quantiles"]
        ),
    }
    write_json(staging / REFERENCE_PROFILE, profile)
    write_json(staging / CALIBRATION, fit_calibration(labels, probabilities, source=source))


def load_split(samples, classes, spec: PreprocessSpec, *, limit: int):
    """Held-out images through the shared preprocessing module, in manifest order."""
    chosen = samples[:limit]
    images = np.stack([preprocess_file(s.path, spec) for s in chosen])
    labels = np.array([classes.index(s.label) for s in chosen])
    return images, labels


def build_metadata(name, version, run_dir, run_info, spec, report, int8_report) -> dict:
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    test = metrics["test"]
    graph_does = (
        "scales [0, 255] to [0, 1] (Rescaling 1/255)"
        if run_info["arch"] == "seed-cnn"
        else f"{run_info['arch']} preprocess_input (inside the graph)"
    )
    import onnxruntime

    return {
        "name": name,
        "version": version,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "architecture": run_info["arch"],
        "classes": run_info["classes"],
        "input": {
            "name": INPUT_NAME,
            "height": spec.height,
            "width": spec.width,
            "channels": spec.channels,
            "layout": "NHWC",
            "dtype": "float32",
        },
        "output": {"name": OUTPUT_NAME, "kind": "softmax probabilities", "dtype": "float32"},
        "preprocessing": {**spec.describe(), "graph_does": graph_does},
        "metrics": {
            key: test[key]
            for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "macro_auc")
        }
        | {"split_sizes": metrics["split_sizes"]},
        "parity": report["summary"],
        "int8": None
        if int8_report is None
        else {k: int8_report[k] for k in ("kept", "fp32_test_accuracy", "int8_test_accuracy")},
        "opset": OPSET,
        "versions": {
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "tf2onnx": tf2onnx.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "source_run": str(Path(run_dir).resolve()),
        "files": {},
    }


def _quantize_and_gate(staging, calibration, test_images, test_labels, activation_type) -> dict:
    int8_path = staging / INT8_MODEL
    settings = quantize.quantize(
        staging / ONNX_MODEL, int8_path, calibration, activation_type=activation_type
    )

    def probabilities(path: Path) -> np.ndarray:
        return parity.run_batched(parity.onnx_predictor(path), test_images, 64)

    def accuracy(found: np.ndarray) -> float:
        return float((found.argmax(axis=1) == test_labels).mean())

    fp32, int8 = probabilities(staging / ONNX_MODEL), probabilities(int8_path)
    vectors = quantize.output_check(fp32, int8)  # the whole vector, not just top-1
    gate = quantize.accuracy_gate(accuracy(fp32), accuracy(int8), vectors["sums_to_one"])
    if not gate["kept"]:
        int8_path.unlink()
        log.warning("INT8 model %s", gate["decision"])
    return {**settings, **vectors, **gate}


def _saved_model_predictor(path: Path):
    signature = tf.saved_model.load(str(path)).signatures["serving_default"]

    def predict(batch: np.ndarray) -> np.ndarray:
        return signature(**{INPUT_NAME: tf.constant(batch)})[OUTPUT_NAME].numpy()

    return predict
