"""ONNX Runtime sessions: the provider (CUDA or CPU, never a silent fallback when CUDA is
asked for), its options, and how batch shapes map to sessions. No TensorFlow here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
from dataclasses import dataclass

import onnxruntime as ort

from serving.core.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
#: How batch shapes map to ONNX Runtime sessions. ``per-bucket``: one session per bucket,
#: its batch dimension fixed, so no session ever sees a second shape (on CUDA a shape change
#: redoes every convolution's cuDNN set-up, ~0.5 s for MobileNetV2, warmed or not);
#: ``shared``: one session for every shape; ``auto``: per-bucket on CUDA, shared on the CPU.
SESSION_MODES = ("auto", "per-bucket", "shared")


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


def create_session(
    model: bytes | str,
    provider: str,
    intra_op_threads: int = 0,
    cuda: CudaOptions | None = None,
    batch: tuple[str | int | None, int] | None = None,
) -> tuple[ort.InferenceSession, str]:
    """An ONNX Runtime session on the requested provider; returns it and the provider in use.

    ``batch``: (the graph's batch dimension, a size) fixes that dimension, so the session
    takes that batch size only (ONNX Runtime refuses any other) and plans for it.

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
    if batch is not None:
        dimension, size = batch
        if not isinstance(dimension, str):
            raise ModelError(
                f"the graph's batch dimension is {dimension!r}, not a named free dimension: "
                "it cannot be fixed per bucket (use session mode shared, or re-export)"
            )
        options.add_free_dimension_override_by_name(dimension, size)
        # Each session has its own intra-op thread pool, whose threads spin after a run:
        # with a pool per bucket the idle ones stole the cores from the running one (mixed
        # batch sizes on 2 cores: 1,009 images/s spinning, 2,622 not; shared 2,677).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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


def resolve_session_mode(mode: str, provider_in_use: str) -> str:
    """``per-bucket`` or ``shared``: what ``auto`` means on the provider in use."""
    if mode == "auto":
        return "per-bucket" if provider_in_use == CUDA else "shared"
    return mode


def expected_provider(provider: str) -> str:
    """``cuda`` or ``cpu``: what ``provider`` (auto, cuda, cpu) will run on if CUDA loads."""
    if provider == "auto":
        return "cuda" if CUDA in ort.get_available_providers() else "cpu"
    return provider


def release_freed_memory() -> bool:
    """Give the memory of sessions just freed back to the system: collect the cycles that hold
    a retired version, then ``malloc_trim`` (glibc). ONNX Runtime frees a session's arena into
    the C heap, where glibc keeps it: a worker's RSS grew from 147 to 332 MB over 200 version
    switches under load (no Python object survived a switch), and stayed flat with this after
    each. Measured again once retiring waited for the old runtime to be collected: 180 to 191
    MB over 200 switches without the trim, so most of that growth was the late collection; the
    trim stays, cheap, for larger models' arenas. False where there is no glibc."""
    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        return False
    return True
