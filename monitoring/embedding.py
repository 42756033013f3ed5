"""Embedding drift: what the model's penultimate features say about a window that its
outputs do not (a new camera, a re-framing, a compression the answers survive).

At export the held-out embeddings are standardised per feature and, when there are more
than ``MAX_COMPONENTS`` features, projected on their first principal components (no
whitening: the classifier's ridge penalty is rotation-invariant, so for small embeddings the
projection changes nothing). That reduction and the reduced reference ship in
``embedding_reference.npz``. A window is compared with the reference by a domain
classifier (Evidently's and alibi-detect's default): a ridge logistic regression told to
separate window from reference, scored out-of-fold; its ROC AUC is 0.5 when it cannot.
Its thresholds are calibrated like the others, on the reference alone (``calibrate``).

The same reference bounds the label-free estimate (``monitoring.estimate``): an image
farther from every reference image than ``SUPPORT_QUANTILE`` of the reference images are
from their own nearest neighbour lies outside what the calibration has seen.

Plain numpy: the service, batch scoring and export share it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np

MAX_COMPONENTS = 64
#: Reference rows kept: the classifier's and the nearest-neighbour cost grow with them.
MAX_REFERENCE = 2000
#: Distinct window embeddings compared at most (the newest).
MAX_WINDOW = 1000
SUPPORT_QUANTILE = 0.999
RIDGE = 1.0
NEWTON_STEPS = 12
#: A Newton step this small changes no score's rank.
CONVERGED = 1e-6
FOLDS = 5
#: Window sizes (distinct embeddings) the AUC thresholds are calibrated at.
CALIBRATION_SIZES = (50, 100, 200, 500, 1000)
CALIBRATION_REPLICATES = 200


@dataclass
class EmbeddingReference:
    """The reduction fitted at export and the reduced held-out embeddings."""

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray  # (k, features); identity when the embedding is small
    reference: np.ndarray  # (n, k), float64
    support_radius: float

    @classmethod
    def fit(cls, embeddings: np.ndarray, seed: int = 0) -> EmbeddingReference:
        embeddings = np.asarray(embeddings, dtype=np.float64)
        if len(embeddings) > MAX_REFERENCE:
            keep = np.random.default_rng(seed).choice(len(embeddings), MAX_REFERENCE, False)
            embeddings = embeddings[np.sort(keep)]
        mean = embeddings.mean(axis=0)
        scale = embeddings.std(axis=0)
        scale[scale < 1e-6] = 1.0  # a dead unit carries nothing; do not divide by zero
        standard = (embeddings - mean) / scale
        features = embeddings.shape[1]
        if features <= MAX_COMPONENTS:
            components = np.eye(features)
        else:
            _, _, vt = np.linalg.svd(standard, full_matrices=False)
            components = vt[:MAX_COMPONENTS]
        reduced = standard @ components.T
        radius = float(
            np.quantile(nearest_distances(reduced, reduced, leave_one_out=True), SUPPORT_QUANTILE)
        )
        return cls(mean, scale, components, reduced, radius)

    def __post_init__(self) -> None:
        # The reduction folded into one affine map: a matrix product per call.
        self._weights = (self.components / self.scale).T.astype(np.float32)
        self._offset = (self.mean @ self._weights).astype(np.float32)

    def reduce(self, embeddings: np.ndarray) -> np.ndarray:
        """Standardise and project (float32; one matrix product)."""
        return np.asarray(embeddings, dtype=np.float32) @ self._weights - self._offset

    def outside_support(self, reduced: np.ndarray) -> np.ndarray:
        """Per row: farther from every reference embedding than the support radius."""
        rows = np.asarray(reduced, dtype=np.float64)
        return nearest_distances(rows, self.reference) > self.support_radius

    def save(self, path: Path) -> None:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            mean=self.mean,
            scale=self.scale,
            components=self.components,
            reference=self.reference.astype(np.float32),
            support_radius=np.float64(self.support_radius),
        )
        Path(path).write_bytes(buffer.getvalue())

    @classmethod
    def from_bytes(cls, data: bytes) -> EmbeddingReference:
        """What ``save`` wrote."""
        with np.load(io.BytesIO(data), allow_pickle=False) as found:
            return cls.from_arrays({name: found[name] for name in found.files})

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> EmbeddingReference:
        """From what ``save`` wrote, as the model directory reads it
        (``serving.core.model_dir.read_monitoring_files``)."""
        return cls(
            arrays["mean"],
            arrays["scale"],
            arrays["components"],
            arrays["reference"].astype(np.float64),
            float(arrays["support_radius"]),
        )


def nearest_distances(
    rows: np.ndarray, reference: np.ndarray, *, leave_one_out: bool = False
) -> np.ndarray:
    """Euclidean distance from each row to its nearest reference row."""
    squared = (
        (rows**2).sum(axis=1)[:, None] - 2 * rows @ reference.T + (reference**2).sum(axis=1)[None]
    )
    if leave_one_out:
        np.fill_diagonal(squared, np.inf)
    return np.sqrt(np.maximum(squared.min(axis=1), 0.0))


def distinct(rows: np.ndarray, limit: int = MAX_WINDOW) -> np.ndarray:
    """The window's distinct embeddings (an image sent again is one image), newest kept."""
    if len(rows) == 0:
        return rows
    _, first = np.unique(rows[::-1], axis=0, return_index=True)
    kept = rows[::-1][np.sort(first)][:limit]
    return kept[::-1]


def domain_classifier_auc(
    reference: np.ndarray, window: np.ndarray, *, seed: int = 0, folds: int = FOLDS
) -> float:
    """Out-of-fold ROC AUC of a ridge logistic regression separating ``window`` rows from
    ``reference`` rows (Newton steps; a few milliseconds for a thousand rows of each)."""
    rows = np.vstack([reference, window])
    target = np.concatenate([np.zeros(len(reference)), np.ones(len(window))])
    order = np.random.default_rng(seed).permutation(len(rows))
    scores = np.zeros(len(rows))
    design = np.hstack([rows, np.ones((len(rows), 1))])
    penalty = RIDGE * np.eye(design.shape[1])
    penalty[-1, -1] = 0.0  # the intercept is not shrunk
    for held in np.array_split(order, folds):
        train = np.setdiff1d(order, held, assume_unique=True)
        x, y = design[train], target[train]
        weights = np.zeros(design.shape[1])
        for _ in range(NEWTON_STEPS):
            p = 1.0 / (1.0 + np.exp(-np.clip(x @ weights, -30, 30)))
            gradient = x.T @ (p - y) + penalty @ weights
            hessian = (x * (p * (1 - p))[:, None]).T @ x + penalty
            step = np.linalg.solve(hessian, gradient)
            weights -= step
            if np.abs(step).max() < CONVERGED:
                break  # Newton's quadratic convergence: usually 5 or 6 steps
        scores[held] = design[held] @ weights
    return rank_auc(scores, target)


def rank_auc(scores: np.ndarray, target: np.ndarray) -> float:
    """Mann-Whitney ROC AUC, ties counted half."""
    ranks = np.empty(len(scores))
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    ranks[order] = np.arange(1, len(scores) + 1)
    # average the ranks of tied scores
    _, start, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for first, count in zip(start[counts > 1], counts[counts > 1], strict=True):
        ranks[order[first : first + count]] = first + (count + 1) / 2
    positives = target.sum()
    negatives = len(target) - positives
    return float(
        (ranks[target == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives)
    )


def calibrate(
    reference: np.ndarray,
    quantiles: dict[str, float],
    *,
    sizes: tuple[int, ...] = CALIBRATION_SIZES,
    replicates: int = CALIBRATION_REPLICATES,
    seed: int = 0,
) -> dict:
    """The AUC a window of in-distribution images reaches by chance.

    Each replicate splits the reference in two halves: one plays the reference, a window
    of each size is drawn (without replacement) from the other. The AUC's spread follows
    Mann-Whitney's ``scale * sqrt(1/n + 1/m)`` for n reference and m window images; the
    replicates fit ``scale`` (and the null mean, a little under 0.5 out of fold), and the
    thresholds are a normal tail at the family's quantiles, for the sizes met at run time.
    """
    rng = np.random.default_rng(seed)
    half = len(reference) // 2
    usable = [size for size in sizes if size <= len(reference) - half] or [len(reference) - half]
    values, spreads = [], []
    for size in usable:
        drawn = []
        for index in range(replicates):
            order = rng.permutation(len(reference))
            drawn.append(
                domain_classifier_auc(
                    reference[order[:half]], reference[order[half : half + size]], seed=index
                )
            )
        values.extend(drawn)
        spreads.append(float(np.std(drawn, ddof=1)) / np.sqrt(1 / half + 1 / size))
    return {
        "statistic": "domain_classifier_auc",
        "method": "reference split in halves, windows drawn from one half; "
        "mean + z * scale * sqrt(1/n + 1/m)",
        "replicates": replicates,
        "window_sizes": usable,
        "null_mean": float(np.mean(values)),
        "scale": float(np.max(spreads)),
        "reference_samples": len(reference),
        "z": {level: NormalDist().inv_cdf(quantile) for level, quantile in quantiles.items()},
    }


def threshold_at(calibration: dict, samples: int) -> dict[str, float]:
    """Warning and critical AUC for a window of ``samples`` distinct embeddings."""
    spread = calibration["scale"] * np.sqrt(
        1 / calibration["reference_samples"] + 1 / max(samples, 1)
    )
    return {
        level: float(calibration["null_mean"] + z * spread) for level, z in calibration["z"].items()
    }
