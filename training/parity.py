"""The parity gate: Keras, the reloaded SavedModel and ONNX Runtime must agree on real images.

Every runtime runs the same held-out images (decoded by the shared preprocessing module) at
batch size 1, an odd size and the largest; outputs must match Keras within rtol/atol and give
identical top-1 classes. Nothing is published unless every check passes.

Batch size 1 runs on the first ``BATCH_ONE_IMAGES`` images only: it exercises the same
kernels for every image, and one Keras call per image made it most of an export's time
(about 5 of 34 s for the digits model on two cores).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np

from serving.core.errors import ImgclfError
from serving.core.model_dir import INPUT_NAME, OUTPUT_NAME

ATOL = 1e-5
RTOL = 1e-4
ODD_BATCH = 7
#: Images checked one at a time (the odd and the largest batch sizes check them all).
BATCH_ONE_IMAGES = 64

Predict = Callable[[np.ndarray], np.ndarray]


class ParityError(ImgclfError):
    """A runtime disagrees with Keras; the export publishes nothing."""

    reason = "model"


def batch_sizes(image_count: int, max_batch_size: int) -> list[int]:
    largest = max(1, min(max_batch_size, image_count))
    return sorted({1, min(ODD_BATCH, largest), largest})


def run_batched(predict: Predict, images: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate(
        [predict(images[start : start + batch_size]) for start in range(0, len(images), batch_size)]
    )


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict:
    difference = np.abs(candidate.astype(np.float64) - reference.astype(np.float64))
    agreement = float((candidate.argmax(axis=1) == reference.argmax(axis=1)).mean())
    within = bool(np.allclose(candidate, reference, rtol=RTOL, atol=ATOL))
    return {
        "max_abs_diff": float(difference.max()),
        "mean_abs_diff": float(difference.mean()),
        "allclose": within,
        "top1_agreement": agreement,
        "passed": within and agreement == 1.0,
    }


def check_parity(
    reference: Predict,
    candidates: dict[str, Predict],
    images: np.ndarray,
    *,
    max_batch_size: int,
) -> dict:
    """Run every check and return the report; raise ``ParityError`` naming the first failure.

    The reference runs once, at the largest batch size: in inference its answer for an image
    does not depend on the batch around it, and Keras called eagerly once per batch of one
    or seven was nine tenths of the check's time."""
    checks = []
    sizes = batch_sizes(len(images), max_batch_size)
    expected_all = run_batched(reference, images, sizes[-1])
    for batch_size in sizes:
        checked = images[:BATCH_ONE_IMAGES] if batch_size == 1 else images
        expected = expected_all[: len(checked)]
        for name, predict in candidates.items():
            result = compare(expected, run_batched(predict, checked, batch_size))
            checks.append(
                {"runtime": name, "batch_size": batch_size, "images": len(checked), **result}
            )
    summary = {
        name: {
            "max_abs_diff": max(c["max_abs_diff"] for c in checks if c["runtime"] == name),
            "top1_agreement": min(c["top1_agreement"] for c in checks if c["runtime"] == name),
            "passed": all(c["passed"] for c in checks if c["runtime"] == name),
        }
        for name in candidates
    }
    report = {
        "reference": "keras",
        "images": len(images),
        "tolerance": {"atol": ATOL, "rtol": RTOL, "top1_agreement": 1.0},
        "batch_sizes": batch_sizes(len(images), max_batch_size),
        "summary": summary,
        "checks": checks,
        "passed": all(c["passed"] for c in checks),
    }
    failed = [c for c in checks if not c["passed"]]
    if failed:
        first = failed[0]
        raise ParityError(
            f"parity check failed: {first['runtime']} at batch size {first['batch_size']} "
            f"differs from Keras by up to {first['max_abs_diff']:.3g} "
            f"(allowed atol {ATOL:g}, rtol {RTOL:g}) with top-1 agreement "
            f"{first['top1_agreement']:.2%}; nothing was published"
        )
    return report


def check_embedding_parity(
    reference: Predict, candidate: Predict, images: np.ndarray, *, batch_size: int
) -> dict:
    """The second output (penultimate features, for embedding drift) must match Keras too:
    within ``RTOL`` of the largest feature, at the largest batch size."""
    expected = run_batched(reference, images, batch_size).astype(np.float64)
    found = run_batched(candidate, images, batch_size).astype(np.float64)
    scale = max(float(np.abs(expected).max()), 1e-6)
    difference = float(np.abs(found - expected).max())
    report = {
        "max_abs_diff": difference,
        "largest_feature": scale,
        "tolerance": f"max_abs_diff <= {RTOL:g} x largest_feature",
        "passed": difference <= RTOL * scale,
    }
    if not report["passed"]:
        raise ParityError(
            f"parity check failed: the ONNX embedding output differs from Keras by up to "
            f"{difference:.3g} (largest feature {scale:.3g}); nothing was published"
        )
    return report


def onnx_predictor(
    path, providers: Iterable[str] = ("CPUExecutionProvider",), output: str = OUTPUT_NAME
) -> Predict:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=list(providers))

    def predict(batch: np.ndarray) -> np.ndarray:
        return session.run([output], {INPUT_NAME: batch})[0]

    return predict
