"""New versions of a published model without TensorFlow: a copy whose ONNX weights carry
some noise (a real, different model: its answers differ from the original's on some
images), published into a model folder by ``imgclf export``'s own staging and publishing
(staged, then renamed into place), or a tampered copy whose bytes no longer match its hashes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from serving.core.model_dir import INT8_MODEL, METADATA, ONNX_MODEL, file_hashes
from training.publish import new_staging, publish


def publish_variant(
    source: Path,
    version: int,
    *,
    noise: float = 0.0,
    seed: int = 0,
    into: Path | None = None,
    name: str | None = None,
    keep_int8: bool = False,
) -> Path:
    """``source`` (a version folder) published again as ``version`` of its model (or of the
    model folder ``into``, named ``name``), with each float weight tensor moved by ``noise``
    times its own standard deviation, and its INT8 model dropped unless ``keep_int8``. (The
    ONNX files' own metadata still name the source's version: nothing that serves reads it.)"""
    root = into or source.parent
    staging = new_staging(root, version)
    shutil.copytree(source, staging, dirs_exist_ok=True)
    if not keep_int8:
        (staging / INT8_MODEL).unlink(missing_ok=True)
    if noise:
        model = onnx.load(staging / ONNX_MODEL)
        rng = np.random.default_rng(seed)
        for tensor in model.graph.initializer:
            values = numpy_helper.to_array(tensor)
            if values.dtype == np.float32 and values.size > 1:
                moved = values + rng.normal(0, noise * float(values.std()), values.shape)
                tensor.CopyFrom(numpy_helper.from_array(moved.astype(np.float32), tensor.name))
        onnx.save(model, staging / ONNX_MODEL)
    metadata = json.loads((staging / METADATA).read_text())
    metadata["version"] = version
    metadata["name"] = name or metadata["name"]
    if not keep_int8:
        metadata["int8"] = None
    metadata["files"] = file_hashes(staging)
    (staging / METADATA).write_text(json.dumps(metadata, indent=2))
    return publish(staging, root, version, force=False)


def tamper(version_dir: Path) -> None:
    """Change one byte of the ONNX model, as a bad copy or an attacker would."""
    path = version_dir / ONNX_MODEL
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
