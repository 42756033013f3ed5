"""The inference runtime: a published model directory in an ONNX Runtime session.

One class, used by the HTTP service, batch scoring and drift reports, so there is one
inference path. No TensorFlow here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.errors import ConfigError, ModelError
from serving.model_dir import (
    INPUT_NAME,
    INT8_MODEL,
    ONNX_MODEL,
    OUTPUT_NAME,
    REFERENCE_PROFILE,
    load_metadata,
    read_verified,
    resolve_model_dir,
)
from serving.preprocessing import PreprocessSpec, preprocess_bytes

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class CudaOptions:
    """CUDA provider options we set (the rest stay ONNX Runtime's defaults). Reported by
    ``/metadata`` so a latency or parity figure can be traced to its settings."""

    device_id: int = 0
    cudnn_conv_algo_search: str = "HEURISTIC"
    tf32: bool = True

    def provider_options(self) -> dict[str, str]:
        return {
            "device_id": str(self.device_id),
            "cudnn_conv_algo_search": self.cudnn_conv_algo_search,
            "use_tf32": "1" if self.tf32 else "0",
        }


class ModelCard:
    """What a model directory says about itself: classes, input contract, limits. Enough to
    validate and decode requests and to format answers, without an inference session."""

    def __init__(
        self,
        model_dir: Path,
        *,
        max_image_bytes: int | None = None,
        max_image_pixels: int | None = None,
    ) -> None:
        self.model_dir = resolve_model_dir(model_dir)
        self.metadata = load_metadata(self.model_dir)
        self.classes: list[str] = list(self.metadata["classes"])
        self.name: str = self.metadata["name"]
        self.version: int = self.metadata["version"]
        self.spec = _spec(self.metadata, max_image_bytes, max_image_pixels)

    def preprocess(self, data: bytes) -> np.ndarray:
        return preprocess_bytes(data, self.spec)

    def top_k(self, probabilities: np.ndarray, k: int) -> list[list[dict]]:
        """Per row, the k most probable classes, best first, as ``{"label", "score"}``."""
        k = min(k, len(self.classes))
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
        return [
            [{"label": self.classes[i], "score": float(row[i])} for i in indices]
            for row, indices in zip(probabilities, order, strict=True)
        ]


class ClassifierRuntime(ModelCard):
    """Load, verify, warm up and run one model version."""

    def __init__(
        self,
        model_dir: Path,
        *,
        provider: str = "auto",
        precision: str = "fp32",
        intra_op_threads: int = 0,
        max_batch_size: int = 64,
        max_image_bytes: int | None = None,
        max_image_pixels: int | None = None,
        cuda: CudaOptions | None = None,
    ) -> None:
        started = time.perf_counter()
        super().__init__(
            model_dir, max_image_bytes=max_image_bytes, max_image_pixels=max_image_pixels
        )
        self.precision = precision
        self.max_batch_size = max_batch_size
        model_file = INT8_MODEL if precision == "int8" else ONNX_MODEL
        hint = " (INT8 was not exported or not kept)" if model_file == INT8_MODEL else ""
        model_bytes = read_verified(self.model_dir, self.metadata, model_file, missing_hint=hint)
        self.session, self.provider = create_session(
            model_bytes, provider, intra_op_threads, cuda or CudaOptions()
        )
        self._check_graph()
        self.load_seconds = time.perf_counter() - started
        self.warmed_batch_sizes: list[int] = []
        self.warm_up_seconds: float | None = None

    @classmethod
    def from_settings(
        cls, model_dir: Path, settings, *, intra_op_threads: int | None = None
    ) -> ClassifierRuntime:
        return cls(
            model_dir,
            provider=settings.provider,
            precision=settings.precision,
            intra_op_threads=(
                settings.intra_op_threads if intra_op_threads is None else intra_op_threads
            ),
            max_batch_size=settings.max_batch_size,
            max_image_bytes=settings.max_image_bytes,
            max_image_pixels=settings.max_image_pixels,
            cuda=CudaOptions(
                settings.cuda_device_id, settings.cudnn_conv_algo_search, settings.cuda_tf32
            ),
        )

    @property
    def provider_options(self) -> dict[str, str]:
        """The options of the provider in use, as ONNX Runtime reports them back."""
        return dict(self.session.get_provider_options().get(self.provider, {}))

    def warm_up(self, sizes: tuple[int, ...] | None = None) -> None:
        """Run each batch size once, so no request pays a first-shape set-up cost (on CUDA,
        cuDNN's algorithm search: 0.5-1.5 s per new shape). Default: 1 and the largest."""
        started = time.perf_counter()
        for size in sorted(set(sizes or (1, self.max_batch_size))):
            self.predict(np.zeros((size, *self.spec.input_shape), dtype=np.float32))
            self.warmed_batch_sizes.append(size)
        self.warm_up_seconds = time.perf_counter() - started

    def predict(self, images: np.ndarray) -> np.ndarray:
        """float32 NHWC batch in [0, 255] -> probabilities, in chunks of ``max_batch_size``."""
        if images.ndim != 4 or images.shape[1:] != self.spec.input_shape:
            raise ValueError(f"expected (N, {self.spec.input_shape}) images, got {images.shape}")
        images = np.ascontiguousarray(images, dtype=np.float32)
        chunks = [
            self.session.run(
                [OUTPUT_NAME], {INPUT_NAME: images[start : start + self.max_batch_size]}
            )[0]
            for start in range(0, len(images), self.max_batch_size)
        ]
        if not chunks:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        return np.concatenate(chunks)

    def reference_profile(self) -> dict | None:
        """The drift reference written at export time (hash-checked), or None if absent."""
        if REFERENCE_PROFILE not in self.metadata["files"]:
            return None
        return json.loads(read_verified(self.model_dir, self.metadata, REFERENCE_PROFILE))

    def describe(self) -> dict:
        """What ``GET /metadata`` answers."""
        meta = self.metadata
        return {
            "name": self.name,
            "version": self.version,
            "classes": self.classes,
            "input": meta["input"],
            "preprocessing": meta["preprocessing"],
            "precision": self.precision,
            "execution_provider": self.provider,
            "provider_options": self.provider_options,
            "max_batch_size": self.max_batch_size,
            "startup": {
                "model_load_seconds": self.load_seconds,
                "warm_up_seconds": self.warm_up_seconds,
                "warmed_batch_sizes": self.warmed_batch_sizes,
            },
            "metrics": meta.get("metrics"),
            "parity": meta.get("parity"),
            "int8": meta.get("int8"),
            "created_at": meta.get("created_at"),
        }

    def _check_graph(self) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if [i.name for i in inputs] != [INPUT_NAME] or [o.name for o in outputs] != [OUTPUT_NAME]:
            raise ModelError(
                f"{self.model_dir}: the graph's inputs/outputs are "
                f"{[i.name for i in inputs]}/{[o.name for o in outputs]}, "
                f"expected [{INPUT_NAME!r}]/[{OUTPUT_NAME!r}]"
            )
        graph_shape = tuple(inputs[0].shape[1:])
        if graph_shape != self.spec.input_shape:
            raise ModelError(
                f"{self.model_dir}: metadata.json says input {self.spec.input_shape} but the "
                f"ONNX graph takes {graph_shape}"
            )
        width = outputs[0].shape[-1]
        if isinstance(width, int) and width != len(self.classes):
            raise ModelError(
                f"{self.model_dir}: metadata.json lists {len(self.classes)} classes but the "
                f"graph outputs {width}"
            )


def create_session(
    model: bytes | str,
    provider: str,
    intra_op_threads: int = 0,
    cuda: CudaOptions | None = None,
) -> tuple[ort.InferenceSession, str]:
    """An ONNX Runtime session on the requested provider; returns it and the provider in use.

    ``cuda`` that cannot load is an error, never a silent CPU fallback; ``auto`` falls back
    and says so. The CUDA branch cannot run in CI (no GPU): see README "GPU".
    """
    if provider not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"provider must be auto, cuda or cpu, got {provider!r}")
    available = ort.get_available_providers()
    wants_cuda = provider == "cuda" or (provider == "auto" and CUDA in available)
    if provider == "cuda" and CUDA not in available:
        raise ModelError(
            "provider cuda requested, but this onnxruntime has no CUDAExecutionProvider "
            "(install the gpu extra: onnxruntime-gpu[cuda,cudnn], not onnxruntime)"
        )
    if wants_cuda and hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* wheels of the [cuda,cudnn] extra
        except Exception as error:  # missing libraries surface as the check below
            log.warning("onnxruntime.preload_dlls() failed: %s", error)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    cuda_options = (cuda or CudaOptions()).provider_options()
    providers = [(CUDA, cuda_options), CPU] if wants_cuda else [CPU]
    try:
        session = ort.InferenceSession(model, sess_options=options, providers=providers)
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise ModelError(f"ONNX Runtime cannot load the model: {first}") from error
    in_use = session.get_providers()[0]
    if wants_cuda and in_use != CUDA:
        if provider == "cuda":
            raise ModelError(
                "provider cuda requested, but ONNX Runtime could not initialise CUDA "
                f"(session runs on {in_use}); check the driver and CUDA/cuDNN libraries"
            )
        log.warning("CUDA is available but could not be initialised; running on %s", in_use)
    log.info("ONNX Runtime session on %s (requested %s)", in_use, provider)
    return session, in_use


def expected_provider(provider: str) -> str:
    """``cuda`` or ``cpu``: what ``provider`` (auto, cuda, cpu) will run on if CUDA loads."""
    if provider == "auto":
        return "cuda" if CUDA in ort.get_available_providers() else "cpu"
    return provider


def _spec(metadata: dict, max_bytes: int | None, max_pixels: int | None) -> PreprocessSpec:
    spec = PreprocessSpec.from_metadata(metadata["preprocessing"])
    limits = {"max_bytes": max_bytes, "max_pixels": max_pixels}
    return dataclasses.replace(spec, **{k: v for k, v in limits.items() if v is not None})
