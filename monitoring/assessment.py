"""What an inference batch answers when the label-free estimate is on: the probabilities,
and their assessment (expected correctness, calibrated probabilities, support, reduced
embeddings) to come. The serving batcher, the routes and the feedback store pass these
answers along as if they were the probabilities; ``Answers`` names the two kinds in their
type hints. Its own module because serving handles the answers and only the prediction
observer (``monitoring.predictions``) assesses them."""

from __future__ import annotations

from typing import Protocol, TypeAlias

import numpy as np


class Assessor(Protocol):
    """What assesses ``Assessed`` answers (``monitoring.predictions.PredictionObserver``):
    the answers ask it when something first needs their assessment."""

    def assess_pending(self) -> None:
        """Assess every batch recorded and not drained yet."""

    def assess_now(self, *batches: AssessedBatch) -> None:
        """Assess these batches, those not assessed yet, in one pass."""


class Assessed:
    """A batch's answers (or one request's rows of them), and what the label-free estimate
    makes of them, computed later: the probabilities are what ``np.asarray`` gives, so an
    answer reads as before; each answer's expected correctness, its calibrated probabilities,
    whether it lies outside the reference's support and its reduced embedding are computed
    for many batches at once by ``PredictionObserver.drain``, off the request path, the first
    time anything asks for them."""

    def __init__(
        self,
        assessor: Assessor,
        probabilities: np.ndarray,
        embeddings: np.ndarray | None,
        batch: AssessedBatch | None = None,
        offset: int = 0,
    ) -> None:
        self.probabilities = probabilities
        self._assessor = assessor
        #: The whole batch's figures, shared by its requests' slices.
        self.batch = batch if batch is not None else AssessedBatch(probabilities, embeddings)
        self._offset = offset

    def __len__(self) -> int:
        return len(self.probabilities)

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.probabilities, dtype=dtype)

    def __getitem__(self, rows: slice) -> Assessed:
        start, _, _ = rows.indices(len(self.probabilities))
        return Assessed(
            self._assessor, self.probabilities[rows], None, self.batch, self._offset + start
        )

    def expected(self) -> list[float]:
        """Each answer's expected correctness (the feedback store asks, when it writes, four
        times a second): every pending batch is assessed in one pass, and left for the next
        drain to record."""
        if self.batch.expected is None:
            self._assessor.assess_pending()
            self._assessor.assess_now(self.batch)  # its record may not have come yet
        return self.batch.expected[self._offset : self._offset + len(self)].tolist()


class AssessedBatch:
    """One inference batch, before and after its assessment."""

    def __init__(self, probabilities: np.ndarray, embeddings: np.ndarray | None) -> None:
        self.probabilities = probabilities
        self.embeddings = embeddings
        self.expected: np.ndarray | None = None
        self.calibrated: np.ndarray | None = None
        self.outside: np.ndarray | None = None
        self.reduced: np.ndarray | None = None


#: What an inference batch answers (and each request's rows of it): probabilities, or
#: probabilities with their label-free assessment to come. ``np.asarray`` of either is the
#: probabilities.
Answers: TypeAlias = np.ndarray | Assessed
