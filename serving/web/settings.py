"""Serving settings: one typed object, read from ``IMGCLF_*`` environment variables once.

``imgclf serve`` and the bentofile set these variables; the service reads them when its
module is loaded by ``bentoml serve`` (each worker process loads it the same way). What the
machine decides when a setting is left open is ``serving.web.sizing``'s."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from serving.core.buckets import normalise_buckets
from serving.core.errors import ConfigError
from serving.web.settings_env import settings_from_env, settings_to_env

#: Settings whose variable, set but empty, means "not set".
OPTIONAL = (
    "model_dir",
    "workers",
    "max_concurrency",
    "decode_threads",
    "batch_decode_bytes",
    "feedback_store_path",
    "grpc_port",
)


class ServingSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    model_dir: Path | None = Field(
        None, description="Serve this published model directory instead of the BentoML store."
    )
    bento_model: str = Field(
        "digits:latest", description="BentoML model store tag packaged by bentoml build."
    )
    provider: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="auto: CUDA when ONNX Runtime can load it, else CPU."
    )
    precision: Literal["fp32", "int8"] = Field("fp32", description="Which ONNX file to run.")
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads; 0: all cores.")
    max_batch_size: int = Field(
        64, ge=1, description="Adaptive batching: most images in one ONNX Runtime call."
    )
    batch_wait_ms: float = Field(
        0.0,
        ge=0,
        description="How long a batch waits for more requests before it runs. 0: it runs as "
        "soon as the session is free, with whatever queued while the last batch ran.",
    )
    max_latency_ms: int = Field(
        1000,
        ge=1,
        description="A request that has waited this long for a batch is answered 503.",
    )
    max_queue_size: int = Field(
        512, ge=1, description="Images waiting for a batch per worker before new ones get 503."
    )
    batch_buckets: tuple[int, ...] | None = Field(
        None,
        description="Batch sizes ONNX Runtime is called with (batches are zero-padded up to "
        "the next one; each is warmed before /readyz is 200). Default: powers of two up to "
        "max_batch_size, and max_batch_size.",
    )
    session_mode: Literal["auto", "per-bucket", "shared"] = Field(
        "auto",
        description="per-bucket: one ONNX Runtime session per batch bucket, its batch size "
        "fixed (each holds its own copy of the weights); shared: one session for every "
        "bucket. auto: per-bucket on CUDA, where a session fed a new shape redoes its cuDNN "
        "set-up (~0.5 s per batch for MobileNetV2), shared on the CPU, where shapes cost "
        "nothing.",
    )
    max_images_per_request: int = Field(
        32, ge=1, description="Images in one /predict_batch (default: 32, or max_batch_size)."
    )
    max_image_bytes: int = Field(
        20 * 1024**2, ge=1024, description="Largest encoded image, in bytes (413 beyond)."
    )
    max_image_pixels: int = Field(
        40_000_000,
        ge=1,
        description="Largest image, in pixels, checked from its header before decoding.",
    )
    max_request_bytes: int = Field(
        64 * 1024**2, ge=1024, description="Largest request body, in bytes (413 beyond)."
    )
    max_header_bytes: int = Field(
        64 * 1024,
        ge=1024,
        description="Largest request line and headers together, in bytes (431 beyond, "
        "refused while they arrive).",
    )
    header_timeout_s: float = Field(
        30.0,
        gt=0,
        description="A request's line and headers must arrive within this many seconds of "
        "its first byte (of the connection's opening, for its first request): 408 and the "
        "connection closed beyond, so that connections that send nothing, or a byte at a "
        "time, cannot hold the worker's sockets.",
    )
    default_top_k: int = Field(5, ge=1, description="Labels in an answer's top_k by default.")
    max_top_k: int = Field(20, ge=1, description="Largest top_k a request may ask for.")
    workers: int | None = Field(
        None,
        ge=1,
        description="Worker processes, each with its own sessions and batcher. Default: one "
        "per core on the CPU provider; on CUDA one per two cores, at most 8.",
    )
    decode_threads: int | None = Field(
        None,
        ge=1,
        description="Threads per worker that decode images (Pillow releases the GIL). "
        "Default: 2 on the CPU provider; on CUDA the cores shared out among the workers, at "
        "least 2.",
    )
    batch_decode_bytes: int | None = Field(
        None,
        ge=0,
        description="A request of one image up to this many bytes has it decoded by its "
        "batch's inference thread, not sent to a decode thread and back (which costs more "
        "than decoding a small image). Default: 65536 on the CPU provider; 0 (every image "
        "on the decode threads) on CUDA, where the inference thread feeds the GPU.",
    )
    cuda_device_id: int = Field(0, ge=0, description="GPU the CUDA provider runs on.")
    cudnn_conv_algo_search: Literal["HEURISTIC", "EXHAUSTIVE", "DEFAULT"] = Field(
        "HEURISTIC",
        description="cuDNN convolution algorithm search. EXHAUSTIVE may find faster kernels but "
        "costs about a second per batch size at warm-up.",
    )
    cuda_tf32: bool = Field(
        True,
        description="TF32 matmuls/convolutions on Ampere and newer GPUs: about 30 % more "
        "images/s at batch 64, max |difference| 8.6e-4 against the CPU on the digits model.",
    )
    grpc_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Also serve the Open Inference Protocol over gRPC on this port (every "
        "worker listens on it). Default: off.",
    )
    grpc_host: str = Field(
        "0.0.0.0",
        description="The interface gRPC listens on (imgclf serve: its --host, unless set).",
    )
    max_concurrency: int | None = Field(
        None, ge=1, description="Requests in flight per worker before 429/503 load shedding."
    )
    timeout_s: int = Field(30, ge=1, description="Request timeout in seconds.")
    drain_window_s: float = Field(
        5.0,
        ge=0,
        description="On SIGTERM a worker answers /readyz 503 but keeps serving new requests "
        "for this long (each answer with 'Connection: close'), so that a load balancer still "
        "sending to it loses nothing while it notices; then it finishes what is in flight. "
        "Raise it to your balancer's health-check interval times its failure threshold.",
    )
    drain_timeout_s: float = Field(
        25.0,
        ge=0,
        description="On SIGTERM a worker stops at most this long after the signal, the drain "
        "window included, whatever is still in flight. Give the container a grace period "
        "above it (docker stop -t 30, terminationGracePeriodSeconds: 30).",
    )
    keep_alive_timeout_s: int = Field(
        75,
        ge=1,
        description="An idle keep-alive connection is closed after this many seconds. Above "
        "the idle timeout of the balancer in front (AWS ALB 60 s, nginx upstream 60 s, "
        "Google Cloud's 600 s: raise it to 620 there), or the balancer may send a request "
        "on a connection the server is closing, and answer it 502.",
    )
    version_poll_s: float = Field(
        2.0,
        ge=0,
        description="Serving repository/<name>: how often each worker reads the versions "
        "file and the published versions (a new version is loaded, verified and warmed "
        "before it answers). 0: serve the version found at start, never switch.",
    )
    shadow_queue_images: int = Field(
        256,
        ge=1,
        description="Copies of live images waiting for the shadow version per worker; more "
        'are dropped (imgclf_shadow_images_total{outcome="dropped"}), never waited for.',
    )
    shadow_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="Scheduling priority (nice) of each worker's shadow thread: on a busy "
        "machine the shadow takes the CPU the live requests leave and drops what it cannot "
        "compare. 0: the live requests' priority.",
    )
    access_log: bool = Field(
        False,
        description="BentoML's access log, one line per request (our routes then take "
        "BentoML's whole middleware stack).",
    )
    bentoml_metrics: bool = Field(
        False,
        description="BentoML's own bentoml_service_request_* metrics for our routes too: they "
        "then take BentoML's whole middleware stack (about 0.15 ms more CPU per request). Off, "
        "imgclf_requests_total, imgclf_request_duration_seconds and "
        "imgclf_requests_in_progress count them.",
    )
    tracing: bool = Field(
        False,
        description="BentoML's OpenTelemetry spans (about 0.2 ms per request; our routes then "
        "take BentoML's whole middleware stack).",
    )
    monitoring: bool = Field(True, description="Prediction metrics and drift monitor.")
    drift_window: int = Field(1000, ge=10, description="Predictions in the live drift window.")
    drift_min_samples: int = Field(
        500, ge=1, description="Below this many predictions drift is not reported."
    )
    drift_interval_s: float = Field(15.0, gt=0, description="How often drift is recomputed.")
    drift_thresholds: Literal["calibrated", "fixed"] = Field(
        "calibrated",
        description="calibrated: each statistic against the thresholds calibrated on the "
        "reference at export, for the window's size; fixed: the rules of thumb (PSI 0.1 / "
        "0.25, JS and KS 0.1 / 0.2).",
    )
    feedback_store_size: int = Field(
        100_000,
        ge=0,
        description="Predictions kept (id, class, time; never the image) for POST /feedback "
        "to match delayed labels to, shared by the workers. 0: no feedback.",
    )
    feedback_store_path: Path | None = Field(
        None,
        description="A SQLite file for the feedback store, for servers meant to share their "
        "labels (replicas of one model behind a balancer). Default: a file in this server's "
        "own runtime folder, which no other server touches.",
    )
    feedback_token: SecretStr | None = Field(
        None,
        description="When set, POST and GET /feedback need 'Authorization: Bearer <token>' "
        "(401 without it): labels drive the accuracy alerts, so only callers you trust should "
        "send them. At least 16 characters; an environment variable only, never an option "
        "(a process listing would show it).",
    )
    feedback_max_age_s: float = Field(
        3 * 86400.0, gt=0, description="Predictions older than this can no longer be labelled."
    )
    feedback_window: int = Field(
        1000, ge=1, description="Labelled predictions behind the rolling accuracy and recall."
    )
    feedback_min_samples: int = Field(
        100, ge=1, description="Labelled predictions needed before accuracy is published."
    )
    accuracy_alert_margin: float = Field(
        0.05,
        ge=0,
        le=1,
        description="The alerts fire when accuracy (labelled, or estimated by mean confidence) "
        "falls this far below its held-out value.",
    )

    @field_validator(*OPTIONAL, mode="before")
    @classmethod
    def _empty_is_none(cls, value):
        return None if value in ("", None) else value

    @field_validator("feedback_token", mode="before")
    @classmethod
    def _a_token_as_mounted(cls, value):
        """Surrounding whitespace stripped (a file-mounted secret ends with a newline, and
        every caller got 401); set but empty refused: that is how an unset secret renders
        into a variable, and it must not turn authentication off unnoticed."""
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, str):
            value = value.strip()
            if not value:
                raise ValueError(
                    "is set but empty (an unset secret?); unset the variable to run "
                    "/feedback without authentication, or give a token"
                )
            if len(value) < 16:
                raise ValueError("a token needs at least 16 characters (try: openssl rand -hex 32)")
        return value

    @field_validator("batch_buckets", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        if isinstance(value, str):
            return tuple(int(part) for part in value.split(",") if part.strip()) or None
        return value

    @model_validator(mode="before")
    @classmethod
    def _request_fits_a_batch(cls, values):
        """Unless set, a request may hold as many images as one batch (at most 32)."""
        if isinstance(values, dict) and values.get("max_images_per_request") is None:
            batch = int(values.get("max_batch_size") or cls.model_fields["max_batch_size"].default)
            values = {**values, "max_images_per_request": min(32, batch)}
        return values

    @model_validator(mode="after")
    def _consistent(self) -> ServingSettings:
        if self.max_images_per_request > self.max_batch_size:
            raise ValueError(
                f"max_images_per_request ({self.max_images_per_request}) cannot exceed "
                f"max_batch_size ({self.max_batch_size}): one request must fit one batch"
            )
        if self.drain_window_s > self.drain_timeout_s:
            raise ValueError(
                f"drain_window_s ({self.drain_window_s:g}) cannot exceed drain_timeout_s "
                f"({self.drain_timeout_s:g}): the window is part of the drain"
            )
        try:
            normalise_buckets(self.batch_buckets, self.max_batch_size)  # the runtime's check
        except ConfigError as error:
            raise ValueError(error.message) from None
        return self

    @property
    def buckets(self) -> tuple[int, ...]:
        """The batch sizes ONNX Runtime sees, ascending."""
        return normalise_buckets(self.batch_buckets, self.max_batch_size)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> ServingSettings:
        """The settings the ``IMGCLF_*`` variables of ``environ`` give (``settings_env``)."""
        return settings_from_env(cls, environ)

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a server process."""
        return settings_to_env(self)
