"""Serving settings: one typed object, read from ``IMGCLF_*`` environment variables once.

``imgclf serve`` and the bentofile set these variables; the service reads them when its
module is loaded by ``bentoml serve`` (each worker process loads it the same way).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serving.errors import ConfigError

ENV_PREFIX = "IMGCLF_"


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
        64, ge=2, description="Adaptive batching limit (>= 2: BentoML issue #4856)."
    )
    max_latency_ms: int = Field(
        1000,
        ge=1,
        description="BentoML's batching deadline: requests it cannot serve within it get 503.",
    )
    max_images_per_request: int = Field(32, ge=1, description="Images in one /predict_batch.")
    max_image_bytes: int = Field(20 * 1024**2, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_request_bytes: int = Field(64 * 1024**2, ge=1024)
    default_top_k: int = Field(5, ge=1)
    max_top_k: int = Field(20, ge=1)
    workers: int = Field(1, ge=1, description="HTTP worker processes (decode, validate).")
    model_workers: int = Field(1, ge=1, description="ONNX Runtime worker processes.")
    max_concurrency: int | None = Field(
        None, ge=1, description="Requests in flight per worker before 429/503 load shedding."
    )
    timeout_s: int = Field(30, ge=1, description="Request timeout in seconds.")
    drain_timeout_s: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM the model service keeps answering while it is still "
        "being called (the HTTP workers drain their requests), for at most this long.",
    )
    monitoring: bool = Field(True, description="Prediction metrics and drift monitor.")
    drift_window: int = Field(1000, ge=10, description="Predictions in the live drift window.")
    drift_min_samples: int = Field(
        500, ge=1, description="Below this many predictions drift is not reported."
    )
    drift_interval_s: float = Field(15.0, gt=0, description="How often drift is recomputed.")

    @field_validator("model_dir", mode="before")
    @classmethod
    def _empty_is_none(cls, value):
        return None if value in ("", None) else value

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServingSettings:
        environ = os.environ if environ is None else environ
        values = {
            name: environ[ENV_PREFIX + name.upper()]
            for name in cls.model_fields
            if ENV_PREFIX + name.upper() in environ
        }
        try:
            return cls.model_validate(values)
        except ValidationError as error:
            first = error.errors()[0]
            name = ENV_PREFIX + str(first["loc"][0]).upper() if first["loc"] else "settings"
            raise ConfigError(f"invalid {name}: {first['msg']}") from error

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a server process."""
        env = {}
        for name, value in self.model_dump().items():
            if value is not None:
                env[ENV_PREFIX + name.upper()] = (
                    str(value).lower() if isinstance(value, bool) else str(value)
                )
        return env
