"""The inference runtime: a published model directory in ONNX Runtime sessions.

One class, used by the HTTP service, batch scoring, evaluation, drift reports and the Ray
engine, so there is one inference path and one set of batch shapes. No TensorFlow here.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort

from serving.core.buckets import normalise_buckets, pad_to_bucket
from serving.core.cam import Head
from serving.core.errors import ConfigError, ModelError
from serving.core.model_card import ModelCard
from serving.core.model_dir import (
    EMBEDDING_NAME,
    EXPLANATION_HEAD,
    FEATURE_MAP_NAME,
    INPUT_NAME,
    INT8_MODEL,
    ONNX_MODEL,
    OUTPUT_NAME,
    MonitoringFiles,
    read_monitoring_files,
    read_verified,
    verify_files,
)
from serving.core.sessions import (
    CUDA,
    SESSION_MODES,
    CudaOptions,
    create_session,
    resolve_session_mode,
)

#: The model files a runtime can run: ``model.onnx`` and ``model.int8.onnx``.
PRECISIONS = ("fp32", "int8")


class ClassifierRuntime(ModelCard):
    """Load, verify, warm up and run one model version.

    The runtime owns batch shapes: every batch is cut into chunks of at most
    ``max_batch_size`` and each chunk zero-padded to the next of ``buckets``, so the
    service, batch scoring, evaluation and the Ray engine all call ONNX Runtime with the
    same few shapes, each warmed by ``warm_up``. ``session_mode`` says whether those shapes
    share one session or get one each (see ``SESSION_MODES``).
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        provider: str = "auto",
        precision: str = "fp32",
        intra_op_threads: int = 0,
        max_batch_size: int = 64,
        buckets: tuple[int, ...] | None = None,
        session_mode: str = "auto",
        max_image_bytes: int | None = None,
        max_image_pixels: int | None = None,
        cuda: CudaOptions | None = None,
    ) -> None:
        started = time.perf_counter()
        super().__init__(
            model_dir, max_image_bytes=max_image_bytes, max_image_pixels=max_image_pixels
        )
        if session_mode not in SESSION_MODES:
            raise ConfigError(
                f"session mode must be one of {', '.join(SESSION_MODES)}, got {session_mode!r}"
            )
        if precision not in PRECISIONS:  # anything else ran the fp32 model without a word
            raise ConfigError(
                f"precision (--precision) must be {' or '.join(PRECISIONS)}, got {precision!r}"
            )
        self.precision = precision
        self.max_batch_size = max_batch_size
        self.buckets = normalise_buckets(buckets, max_batch_size)
        model_file = INT8_MODEL if precision == "int8" else ONNX_MODEL
        hint = " (INT8 was not exported or not kept)" if model_file == INT8_MODEL else ""
        model_bytes = read_verified(self.model_dir, self.metadata, model_file, missing_hint=hint)
        self._threads = intra_op_threads
        self._cuda = cuda or CudaOptions()
        session, self.provider = create_session(model_bytes, provider, intra_op_threads, self._cuda)
        self._check_graph(session)
        self.session_mode = resolve_session_mode(session_mode, self.provider)
        self.weights_bytes = len(model_bytes)
        self._sessions: dict[int, ort.InferenceSession] = {}
        self._lock = threading.Lock()
        #: ONNX Runtime calls per bucket (padded batch size), for tests and ``describe``.
        self.runs_by_bucket: Counter[int] = Counter()
        if self.session_mode == "per-bucket":
            self._model_bytes, self._batch_dim = model_bytes, session.get_inputs()[0].shape[0]
            self._shared = None
            self._session_for(self.buckets[-1])  # proves a fixed-shape session loads here
        else:
            self._shared = session
        self._references: MonitoringFiles | None = None
        self._head: Head | None = None
        self.load_seconds = time.perf_counter() - started
        self.warmed_batch_sizes: list[int] = []
        self.warm_up_seconds: float | None = None

    @classmethod
    def from_settings(
        cls, model_dir: Path, settings, *, intra_op_threads: int | None = None
    ) -> ClassifierRuntime:
        """The runtime a server serves: loaded with its settings, and verified."""
        return cls(
            model_dir,
            provider=settings.provider,
            precision=settings.precision,
            intra_op_threads=(
                settings.intra_op_threads if intra_op_threads is None else intra_op_threads
            ),
            max_batch_size=settings.max_batch_size,
            buckets=settings.buckets,
            session_mode=settings.session_mode,
            max_image_bytes=settings.max_image_bytes,
            max_image_pixels=settings.max_image_pixels,
            cuda=CudaOptions(
                settings.cuda_device_id, settings.cudnn_conv_algo_search, settings.cuda_tf32
            ),
        ).verify()

    @property
    def sessions(self) -> dict[int | None, ort.InferenceSession]:
        """The live sessions: ``{bucket: session}`` per bucket, or ``{None: session}``."""
        return {None: self._shared} if self._shared is not None else dict(self._sessions)

    @property
    def provider_options(self) -> dict[str, str]:
        """The options of the provider in use, as ONNX Runtime reports them back."""
        session = next(iter(self.sessions.values()))
        return dict(session.get_provider_options().get(self.provider, {}))

    def warm_up(self, sizes: tuple[int, ...] | None = None) -> None:
        """Run each batch size once (default: every bucket), so no request pays a
        first-shape set-up cost (on CUDA, cuDNN's algorithm search) or, per bucket, the
        creation of its session."""
        started = time.perf_counter()
        for size in sorted(set(sizes or self.buckets)):
            self.predict(np.zeros((size, *self.spec.input_shape), dtype=np.float32))
            self.warmed_batch_sizes.append(size)
        self.warm_up_seconds = time.perf_counter() - started

    def predict(self, images: np.ndarray) -> np.ndarray:
        """float32 NHWC batch in [0, 255] -> probabilities, in chunks of ``max_batch_size``,
        each padded to its bucket."""
        found = self.run_outputs(images, (OUTPUT_NAME,))
        return found[0] if found else np.zeros((0, len(self.classes)), dtype=np.float32)

    def run_outputs(self, images: np.ndarray, outputs: tuple[str, ...]) -> list[np.ndarray]:
        """The graph's ``outputs`` of a float32 NHWC batch in [0, 255], one array each, in
        chunks of ``max_batch_size``, each padded to its bucket (none for no images)."""
        if images.ndim != 4 or images.shape[1:] != self.spec.input_shape:
            raise ValueError(f"expected (N, {self.spec.input_shape}) images, got {images.shape}")
        images = np.ascontiguousarray(images, dtype=np.float32)
        chunks = [
            [
                found[: min(self.max_batch_size, len(images) - start)]
                for found in self._run(
                    pad_to_bucket(images[start : start + self.max_batch_size], self.buckets),
                    outputs,
                )
            ]
            for start in range(0, len(images), self.max_batch_size)
        ]
        return [
            parts[0] if len(parts) == 1 else np.concatenate(parts)
            for parts in zip(*chunks, strict=True)
        ]

    def predict_with_embeddings(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and the penultimate features from the same run (None when the
        graph has no embedding output): the features are on the way to the probabilities,
        so asking for them costs a copy, not a computation."""
        if not self.has_embedding:
            return self.predict(images), None
        found = self.run_outputs(images, (OUTPUT_NAME, EMBEDDING_NAME))
        if not found:
            return np.zeros((0, len(self.classes)), np.float32), np.zeros((0, 0), np.float32)
        probabilities, embeddings = found
        return probabilities, embeddings

    def _run(self, batch: np.ndarray, outputs: tuple[str, ...]) -> list[np.ndarray]:
        bucket = len(batch)
        session = self._shared if self._shared is not None else self._session_for(bucket)
        self.runs_by_bucket[bucket] += 1
        return session.run(list(outputs), {INPUT_NAME: batch})

    @property
    def has_class_activation(self) -> bool:
        """Whether ``/explain?method=cam`` can explain this version: its graph answers the
        feature map and its directory holds the head after it (exported since both were)."""
        return self.has_feature_map and EXPLANATION_HEAD in self.metadata["files"]

    def explanation_head(self) -> Head:
        """The layers after the feature map (hash-checked and parsed), read once; for a
        version that ``has_class_activation`` (``serving.core.explain.method_for`` says so
        to the user of one that has not)."""
        if self._head is None:
            data = read_verified(self.model_dir, self.metadata, EXPLANATION_HEAD)
            self._head = Head.from_bytes(data, str(self.model_dir / EXPLANATION_HEAD))
        return self._head

    def _session_for(self, bucket: int) -> ort.InferenceSession:
        """The bucket's own session, made on first use (``warm_up`` makes them all), with
        its batch dimension fixed so that ONNX Runtime itself refuses any other shape."""
        session = self._sessions.get(bucket)
        if session is not None:
            return session
        with self._lock:
            if bucket not in self._sessions:
                self._sessions[bucket], _ = create_session(
                    self._model_bytes,
                    self.provider_name,
                    self._threads,
                    self._cuda,
                    batch=(self._batch_dim, bucket),
                )
            return self._sessions[bucket]

    @property
    def provider_name(self) -> str:
        """``cuda`` or ``cpu``: the provider in use, as a ``provider`` argument."""
        return "cuda" if self.provider == CUDA else "cpu"

    def describe_sessions(self) -> dict:
        """How batch shapes map to sessions, with each session's input shape as ONNX Runtime
        reports it (a fixed batch size per bucket, or the free dimension when shared)."""
        return {
            "mode": self.session_mode,
            "buckets": list(self.buckets),
            "count": len(self.sessions),
            "input_shapes": {
                str(bucket if bucket is not None else "all"): list(session.get_inputs()[0].shape)
                for bucket, session in sorted(self.sessions.items(), key=lambda item: item[0] or 0)
            },
            "runs_by_bucket": {str(k): v for k, v in sorted(self.runs_by_bucket.items())},
            # Each session holds its own copy of the weights (on CUDA, in GPU memory).
            "weights_bytes_per_session": self.weights_bytes,
        }

    def summary(self) -> str:
        """One line for start-up logs."""
        return (
            f"{self.name} v{self.version} on {self.provider}, {self.precision}, buckets "
            f"{','.join(map(str, self.buckets))}, sessions {self.session_mode} "
            f"({len(self.buckets) if self.session_mode == 'per-bucket' else 1})"
        )

    def verify(self) -> ClassifierRuntime:
        """Everything a server reads of this version, read and checked now: every file that
        metadata.json hashes, and the monitoring references parsed (and kept). A version
        whose side files are missing or changed is refused where it is loaded (by the
        commands, at start-up, by the watcher), never later in a worker that has already
        switched. ``ModelError`` says why not."""
        verify_files(self.model_dir, self.metadata)
        self.monitoring_files()
        if self.has_class_activation:
            self.explanation_head()
        return self

    def reference_profile(self) -> dict | None:
        """The drift reference written at export time (hash-checked), or None if absent."""
        return self.monitoring_files().profile

    def monitoring_files(self) -> MonitoringFiles:
        """The monitoring references written at export (hash-checked and parsed), read once."""
        if self._references is None:
            self._references = read_monitoring_files(
                self.model_dir, self.metadata, embedding=self.has_embedding
            )
        return self._references

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
            "sessions": self.describe_sessions(),
            "startup": {
                "model_load_seconds": self.load_seconds,
                "warm_up_seconds": self.warm_up_seconds,
                "warmed_batch_sizes": self.warmed_batch_sizes,
            },
            "metrics": meta.get("metrics"),
            "parity": meta.get("parity"),
            "int8": meta.get("int8"),
            # What /explain's cam reads (None: exported before it, explained by occlusion).
            "explanation": meta.get("explanation") if self.has_class_activation else None,
            "created_at": meta.get("created_at"),
        }

    def _check_graph(self, session: ort.InferenceSession) -> None:
        inputs, outputs = session.get_inputs(), session.get_outputs()
        names = sorted(o.name for o in outputs)
        if [i.name for i in inputs] != [INPUT_NAME] or names not in (
            [OUTPUT_NAME],
            sorted([OUTPUT_NAME, EMBEDDING_NAME]),
            sorted([OUTPUT_NAME, EMBEDDING_NAME, FEATURE_MAP_NAME]),
        ):
            raise ModelError(
                f"{self.model_dir}: the graph's inputs/outputs are "
                f"{[i.name for i in inputs]}/{names}, expected [{INPUT_NAME!r}]/"
                f"[{OUTPUT_NAME!r}] and optionally {EMBEDDING_NAME!r}, then {FEATURE_MAP_NAME!r}"
            )
        #: Whether the graph has the penultimate features (models exported before have not).
        self.has_embedding = EMBEDDING_NAME in names
        #: Whether it has the last feature map, for ``/explain``'s cam (the same).
        self.has_feature_map = FEATURE_MAP_NAME in names
        outputs = [o for o in outputs if o.name == OUTPUT_NAME]
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
