"""Inference runtimes side by side: ONNX Runtime fp32 and int8 vs the SavedModel's serving function.

Two models: the exported digits model (``make run`` publishes it) and a seed CNN at 64x64
exported the same way (fp32 + static int8 calibrated on digits). Batch sizes 1 and 32, and
mixed sizes (the sequence a loaded batcher produces, a different size almost every call;
the published model also through ``ClassifierRuntime``, its buckets in one shared session
and in one session per bucket), rounds alternating between runtimes so machine noise hits
all of them. Run by hand:

    .venv/bin/python benchmarks/bench_runtimes.py [--model model_repository/digits] [--seconds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnxruntime as ort
import tensorflow as tf

from benchmarks.common import machine, mixed_batch_sizes, table, time_mixed
from serving.core.model_dir import (
    INT8_MODEL,
    ONNX_MODEL,
    SAVED_MODEL,
    load_metadata,
)
from serving.core.preprocessing import PreprocessSpec, preprocess_file
from serving.core.roles import resolve_model_dir
from serving.core.runtime import ClassifierRuntime
from training import datasets, explanation, export, quantize
from training.models import seed_cnn


def digits_images(size: int, count: int) -> np.ndarray:
    folder = datasets.discover(datasets.write_digits())
    spec = PreprocessSpec(size, size)
    return np.stack([preprocess_file(s.path, spec) for s in folder.samples[:count]])


def seed_cnn_64(workdir: Path) -> Path:
    """An untrained seed CNN at 64x64 exported like a real one (speed does not need training)."""
    model = seed_cnn((64, 64, 3), 10)
    serve = export.serving_function(explanation.features_model(model, None), (64, 64, 3))
    export.write_saved_model(model, serve, workdir / SAVED_MODEL)
    export.write_onnx(serve, (64, 64, 3), workdir / ONNX_MODEL)
    quantize.quantize(workdir / ONNX_MODEL, workdir / INT8_MODEL, digits_images(64, 256))
    return workdir


def runtimes(model_dir: Path, published: bool) -> dict:
    def onnx_runtime(path: Path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda batch: session.run(["probabilities"], {"image": batch})[0]

    signature = tf.saved_model.load(str(model_dir / SAVED_MODEL)).signatures["serving_default"]
    found = {
        "SavedModel serving_default": lambda batch: signature(image=tf.constant(batch))[
            "probabilities"
        ].numpy(),
        "ONNX Runtime fp32": onnx_runtime(model_dir / ONNX_MODEL),
    }
    if (model_dir / INT8_MODEL).exists():
        found["ONNX Runtime int8"] = onnx_runtime(model_dir / INT8_MODEL)
    if published:  # the serving runtime: padded to buckets, both session modes
        for mode in ("shared", "per-bucket"):
            runtime = ClassifierRuntime(model_dir, provider="cpu", session_mode=mode)
            runtime.warm_up()
            found[f"imgclf runtime, {mode} sessions"] = runtime.predict
    return found


def bench_model(
    label: str, model_dir: Path, size: int, seconds: float, rounds: int, published: bool = False
) -> list[list]:
    found = runtimes(model_dir, published)
    images = digits_images(size, 64)
    rows = []
    for load in ("1", "32", "mixed 1-64"):
        sizes = mixed_batch_sizes(256, 64) if load.startswith("mixed") else [int(load)]
        samples = {name: [] for name in found}
        for _ in range(rounds):  # alternate runtimes within each round
            for name, predict in found.items():
                predict(images[: sizes[0]])
                samples[name].append(time_mixed(predict, images, sizes, seconds / rounds))
        baseline = statistics.median(
            r["images_per_s"] for r in samples["SavedModel serving_default"]
        )
        fp32 = statistics.median(r["images_per_s"] for r in samples["ONNX Runtime fp32"])
        for name, results in samples.items():
            speed = statistics.median(r["images_per_s"] for r in results)
            rows.append(
                [
                    label,
                    load,
                    name,
                    statistics.median(r["p50_ms"] for r in results),
                    statistics.median(r["p99_ms"] for r in results),
                    speed,
                    f"{speed / baseline:.1f}x",
                    f"{speed / fp32:.2f}x",
                ]
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("model_repository/digits"))
    parser.add_argument("--seconds", type=float, default=3.0, help="per runtime and batch size")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    model_dir = resolve_model_dir(args.model)
    metadata = load_metadata(model_dir)
    size = metadata["input"]["height"]
    rows = bench_model(
        f"digits v{metadata['version']} ({size}x{size})",
        model_dir,
        size,
        args.seconds,
        args.rounds,
        published=True,
    )
    with tempfile.TemporaryDirectory() as scratch:
        rows += bench_model(
            "seed CNN 64x64", seed_cnn_64(Path(scratch)), 64, args.seconds, args.rounds
        )
    print(f"machine: {machine()}; onnxruntime {ort.__version__}, TensorFlow {tf.__version__}")
    print(
        f"intra-op threads: defaults of each runtime; median of {args.rounds} alternating "
        f"rounds, {args.seconds:g} s per runtime and batch size\n"
    )
    print(
        table(
            [
                "model",
                "batch",
                "runtime",
                "p50 ms/call",
                "p99 ms/call",
                "images/s",
                "vs SavedModel",
                "vs ORT fp32",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
