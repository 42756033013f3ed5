"""Static INT8 quantization with ONNX Runtime, kept only if held-out accuracy survives.

QDQ format, per-channel weights, MinMax calibration on validation images (never the test
split, which judges the result). Activation type follows the pinned ONNX Runtime's own CPU
guidance: uint8 activations with int8 weights on x86, int8 for both on ARM.

Before quantizing, BatchNormalization scales that follow a ReLU are folded into the
convolution before it (exact when every scale is positive). Left in place, each becomes a
per-channel QLinearMul between quantized convolutions that cost as much as the convolutions
saved: INT8 was 1.04-1.16x fp32 at batch 32 without the fold, 1.45-1.95x with it.
"""

from __future__ import annotations

import collections
import platform
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from serving.core.model_dir import INPUT_NAME, OUTPUT_NAME

MAX_ACCURACY_DROP = 0.01


def default_activation_type() -> str:
    return "int8" if platform.machine().lower() in ("arm64", "aarch64") else "uint8"


def quantize(
    fp32_path: Path,
    int8_path: Path,
    calibration_images: np.ndarray,
    *,
    activation_type: str | None = None,
    calibration_batch_size: int = 32,
) -> dict:
    """Write ``int8_path``; return the settings used."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    activation_type = activation_type or default_activation_type()
    activation = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[activation_type]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(
                {INPUT_NAME: calibration_images[start : start + calibration_batch_size]}
                for start in range(0, len(calibration_images), calibration_batch_size)
            )

        def get_next(self):
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as scratch:
        folded = Path(scratch) / "folded.onnx"
        model = onnx.load(str(fp32_path))
        folded_scales = fold_positive_scales(model)
        onnx.save(model, str(folded))
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(folded), str(prepared))
        float_nodes = classifier_head(onnx.load(str(prepared)))
        quantize_static(
            str(prepared),
            str(int8_path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=activation,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            # The softmax and the last MatMul stay in float: a quantized softmax gives
            # probabilities in steps of 1/255 that do not sum to 1, and ties at 0 after top-1.
            nodes_to_exclude=float_nodes,
        )
    return {
        "format": "QDQ",
        "per_channel": True,
        "activation_type": activation_type,
        "weight_type": "int8",
        "calibration": "MinMax",
        "calibration_images": len(calibration_images),
        "folded_scales": folded_scales,
        "float_nodes": float_nodes,
    }


def classifier_head(model: onnx.ModelProto) -> list[str]:
    """The nodes from the last MatMul (or Gemm) to the output's Softmax, which quantization
    leaves in float: the Softmax, a bias Add, the MatMul."""
    producers = {output: node for node in model.graph.node for output in node.output}
    node = producers.get(OUTPUT_NAME)  # by name: the graph has the embedding output too
    head = []
    while node is not None and node.op_type in ("Softmax", "Add", "MatMul", "Gemm"):
        head.append(node.name)
        if node.op_type in ("MatMul", "Gemm"):
            break
        node = producers.get(node.input[0])
    return head


def output_check(fp32: np.ndarray, int8: np.ndarray) -> dict:
    """The INT8 model's whole probability vectors against fp32's, not just top-1: each must
    still sum to 1 (within 1e-3) for top_k beyond the first to mean anything."""
    sum_error = float(np.abs(int8.sum(axis=1) - 1.0).max())
    return {
        "max_abs_diff": float(np.abs(int8 - fp32).max()),
        "max_sum_error": sum_error,
        "sums_to_one": sum_error <= 1e-3,
    }


def fold_positive_scales(model: onnx.ModelProto) -> int:
    """Rewrite ``Conv -> Relu -> Mul(a)`` as ``Conv(W*a, b*a) -> Relu`` where every per-channel
    ``a`` is positive (``a * relu(z) == relu(a * z)``), and ``MatMul -> Mul(a)`` as
    ``MatMul(W*a)``; returns how many Muls were removed."""
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    consumers = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    producer = {output: node for node in graph.node for output in node.output}
    folded = 0
    for mul in [node for node in graph.node if node.op_type == "Mul"]:
        source, constant = mul.input
        if constant not in initializers:
            source, constant = constant, source
        if _fold_into_matmul(mul, source, constant, initializers, producer, consumers, graph):
            folded += 1
            continue
        relu = producer.get(source)
        conv = producer.get(relu.input[0]) if relu is not None and relu.op_type == "Relu" else None
        if (
            constant not in initializers
            or conv is None
            or conv.op_type != "Conv"
            or len(consumers[conv.output[0]]) != 1
            or len(consumers[relu.output[0]]) != 1
            or any(len(consumers[name]) != 1 for name in conv.input[1:])
        ):
            continue
        weights = numpy_helper.to_array(initializers[conv.input[1]])
        channels = weights.shape[0]
        scale = numpy_helper.to_array(initializers[constant])
        if scale.shape not in ((channels, 1, 1), (1, channels, 1, 1)):
            continue  # not one value per output channel on the NCHW channel axis
        scale = scale.reshape(channels)
        if not (scale > 0).all():
            continue
        _replace(initializers[conv.input[1]], weights * scale[:, None, None, None])
        if len(conv.input) > 2:
            _replace(
                initializers[conv.input[2]],
                numpy_helper.to_array(initializers[conv.input[2]]) * scale,
            )
        _bypass(mul, relu.output[0], constant, initializers, consumers, graph)
        folded += 1
    return folded


def _fold_into_matmul(mul, source, constant, initializers, producer, consumers, graph) -> bool:
    """``MatMul(x, W) -> Mul(a)`` (a BatchNormalization right after a Dense layer) becomes
    ``MatMul(x, W*a)``: exact for any sign, since nothing non-linear sits between them."""
    matmul = producer.get(source)
    if (
        constant not in initializers
        or matmul is None
        or matmul.op_type != "MatMul"
        or matmul.input[1] not in initializers
        or len(consumers[matmul.output[0]]) != 1
        or len(consumers[matmul.input[1]]) != 1
    ):
        return False
    weights = numpy_helper.to_array(initializers[matmul.input[1]])
    scale = numpy_helper.to_array(initializers[constant])
    if weights.ndim != 2 or scale.reshape(-1).shape != (weights.shape[1],):
        return False
    _replace(initializers[matmul.input[1]], weights * scale.reshape(1, -1))
    _bypass(mul, matmul.output[0], constant, initializers, consumers, graph)
    return True


def _bypass(mul, replacement: str, constant: str, initializers, consumers, graph) -> None:
    """Remove a folded ``Mul``: its consumers read ``replacement`` instead, and its constant
    goes too unless something else uses it."""
    for node in consumers[mul.output[0]]:
        for position, name in enumerate(node.input):
            if name == mul.output[0]:
                node.input[position] = replacement
    graph.node.remove(mul)
    if len(consumers[constant]) == 1:
        graph.initializer.remove(initializers[constant])


def _replace(tensor: onnx.TensorProto, values: np.ndarray) -> None:
    tensor.CopyFrom(
        numpy_helper.from_array(values.astype(numpy_helper.to_array(tensor).dtype), tensor.name)
    )


def accuracy_gate(fp32_accuracy: float, int8_accuracy: float, sums_to_one: bool = True) -> dict:
    """Keep INT8 when held-out accuracy stays within a point of fp32 and its outputs are
    still probability vectors."""
    within = int8_accuracy >= fp32_accuracy - MAX_ACCURACY_DROP
    kept = within and sums_to_one
    if kept:
        decision = "kept: within 1 point of fp32"
    elif not within:
        decision = f"dropped: {fp32_accuracy - int8_accuracy:.2%} below fp32 (limit 1 point)"
    else:
        decision = "dropped: its probabilities do not sum to 1"
    return {
        "fp32_test_accuracy": fp32_accuracy,
        "int8_test_accuracy": int8_accuracy,
        "max_drop": MAX_ACCURACY_DROP,
        "kept": kept,
        "decision": decision,
    }
