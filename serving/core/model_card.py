"""What a model directory says about itself, without an inference session: its classes,
input contract and limits, enough to decode requests and format answers
(``ClassifierRuntime`` adds the sessions)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from serving.core.model_dir import load_metadata
from serving.core.preprocessing import PreprocessSpec, preprocess_bytes
from serving.core.roles import resolve_model_dir


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


def _spec(metadata: dict, max_bytes: int | None, max_pixels: int | None) -> PreprocessSpec:
    spec = PreprocessSpec.from_metadata(metadata["preprocessing"])
    limits = {"max_bytes": max_bytes, "max_pixels": max_pixels}
    return dataclasses.replace(spec, **{k: v for k, v in limits.items() if v is not None})
