"""Delayed labels over HTTP: ``POST /feedback`` matches true labels to earlier predictions by
request id; ``GET /feedback`` reports accuracy, per-class scores and the confusion matrix of
the last labelled predictions (``imgclf evaluate``'s figures for production traffic, from
ids and classes alone: no image is kept).

    POST /feedback  {"request_id": "...", "label": "7"}          one label
    POST /feedback  [{"request_id": "...", "label": "7"}, ...]    up to 1,000 at once

A call is applied whole or not at all: an unknown label (422), an unknown or expired id (404)
or one labelled before (409) refuses it, lists every bad item under ``problems``, and
counts nothing; a store that cannot be used now (a full disk, a corrupt file being
replaced) answers 503 with ``Retry-After``. Labels drive the accuracy alerts: with
``IMGCLF_FEEDBACK_TOKEN`` set, both methods need ``Authorization: Bearer <token>`` (401
without it, before the body is read).
"""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass

from starlette.requests import Request
from starlette.routing import Route

from monitoring.feedback import FeedbackStore
from monitoring.feedback_errors import FeedbackError
from monitoring.observers import FeedbackObserver
from serving.core.errors import ImgclfError, NotFoundError, UnauthorizedError
from serving.web.context import WorkerContext, handle
from serving.web.requests import parse_json, read_body

MAX_ITEMS = 1000
MAX_BODY_BYTES = 1024 * 1024


@dataclass
class Feedback:
    """A worker's view of the shared store and its metrics."""

    store: FeedbackStore
    observer: FeedbackObserver
    #: The bearer token both methods need (``IMGCLF_FEEDBACK_TOKEN``), or None: anyone.
    token: str | None = None


#: The HTTP status of each reason the feedback store refuses feedback for
#: (``monitoring.feedback_errors.REASONS``).
REFUSAL_STATUS = {
    "unknown_label": 422,
    "unknown_request_id": 404,
    "duplicate_feedback": 409,
    "store_unavailable": 503,
}


class RefusedFeedbackError(ImgclfError):
    def __init__(self, error: FeedbackError) -> None:
        super().__init__(error.message, reason=error.reason)
        self.status_code = REFUSAL_STATUS[error.reason]
        self.details = {"problems": error.problems[:100]} if error.problems else None
        if self.status_code == 503:
            self.headers = {"Retry-After": "5"}


async def _in_thread(function, *args):
    """``function(*args)`` off the event loop, the store's refusals as HTTP errors."""
    try:
        return await asyncio.to_thread(function, *args)
    except FeedbackError as error:
        raise RefusedFeedbackError(error) from None


def feedback_routes() -> list[Route]:
    """One route for both methods, so that a third method gets 405 with ``Allow: GET,
    POST``."""

    async def feedback(request: Request):
        return await (post_feedback if request.method == "POST" else get_feedback)(request)

    return [Route("/feedback", feedback, methods=["GET", "POST"])]


def _enabled(worker: WorkerContext, request: Request) -> Feedback:
    """The worker's feedback, once the caller has shown the token (when one is set)."""
    if worker.feedback is None:
        raise NotFoundError(
            "feedback is off on this server (IMGCLF_FEEDBACK_STORE_SIZE=0 or "
            "IMGCLF_MONITORING=false)",
            reason="feedback_off",
        )
    expected = worker.feedback.token
    if expected is not None:
        scheme, _, sent = request.headers.get("authorization", "").partition(" ")
        # Constant time: how much of a guess matched must not show in the answer's timing.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            sent.strip().encode(), expected.encode()
        ):
            raise UnauthorizedError(
                "/feedback needs 'Authorization: Bearer <token>' with this server's "
                "IMGCLF_FEEDBACK_TOKEN"
            )
    return worker.feedback


def parse_items(body: bytes) -> list[tuple[str, str]]:
    """``(request_id, label)`` pairs from one JSON object or a list of them."""
    document = parse_json(body, "the body")
    entries = document if isinstance(document, list) else [document]
    if not entries or len(entries) > MAX_ITEMS:
        raise ImgclfError(f"send 1 to {MAX_ITEMS} labels, got {len(entries)}")
    items = []
    for index, entry in enumerate(entries):
        where = f"item {index}: " if isinstance(document, list) else ""
        if not isinstance(entry, dict):
            raise ImgclfError(f'{where}expected {{"request_id": "...", "label": "..."}}')
        rid, label = entry.get("request_id"), entry.get("label")
        if not isinstance(rid, str) or not 0 < len(rid) <= 200:
            raise ImgclfError(f"{where}request_id must be the id of a prediction (a string)")
        if not isinstance(label, str):
            raise ImgclfError(f"{where}label must be a class name (a string)")
        items.append((rid, label))
    return items


async def post_feedback(request: Request):
    async def work(worker: WorkerContext):
        feedback = _enabled(worker, request)
        items = parse_items(await read_body(request, MAX_BODY_BYTES))
        result = await _in_thread(feedback.store.label, items)
        summary = await _in_thread(feedback.store.summary, worker.versions.live.version)
        feedback.observer.labelled(result["outcomes"], summary)
        return {
            "accepted": result["accepted"],
            "correct": sum(correct for _, correct, _ in result["outcomes"]),
            "labelled": summary["count"],
            "accuracy": summary["accuracy"] if summary["count"] else None,
        }

    return await handle(request, "feedback", work)


async def get_feedback(request: Request):
    async def work(worker: WorkerContext):
        feedback = _enabled(worker, request)
        live = worker.versions.live
        summary = await _in_thread(feedback.store.summary, live.version)
        return {
            "labelled": summary.pop("count"),
            **summary,
            "min_samples": feedback.observer.min_samples,
            # The held-out figures of the version answering now.
            "reference": live.predictions.reference_performance if live.predictions else None,
        }

    return await handle(request, "feedback_report", work)
