"""How the feedback store says no: the reasons it refuses feedback for, the operations its
file can fail in, and ``FeedbackError``, which carries the reason and every bad item. Its own
module because these are the store's contract with the service (``serving.web.labels`` maps
each reason to an HTTP status, the observers count each operation's failures) and hold no
SQLite."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Why feedback is refused: a label that is not a class, an id the store does not hold (never
#: stored, evicted or expired), an id that was labelled before, a store that cannot be read or
#: written now (a full disk, a corrupt file: see ``monitoring.store_file``).
REASONS = ("unknown_label", "unknown_request_id", "duplicate_feedback", "store_unavailable")
#: What the store was doing when its file failed (``imgclf_feedback_store_errors_total``).
STORE_OPERATIONS = ("open", "write", "read", "label")


@dataclass
class FeedbackError(Exception):
    """Feedback that was not applied, and why, item by item; nothing of the call counted.
    ``reason`` is one of ``REASONS``; the service maps it to an HTTP status."""

    reason: str
    message: str
    problems: list[dict] = field(default_factory=list)

    def __str__(self) -> str:
        return self.message


def unavailable(reason: str) -> FeedbackError:
    """The store's file failed (``reason``: ``monitoring.store_file.REASONS``): nothing was
    counted, and the caller may send the same labels again."""
    return FeedbackError(
        "store_unavailable",
        f"the feedback store cannot be used now ({reason.replace('_', ' ')}); nothing was "
        "counted: send the labels again later",
    )


def refusal(problems: list[dict]) -> FeedbackError:
    """The call's bad items (each with its ``reason``): refused under the first one's."""
    first = problems[0]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return FeedbackError(
        first["reason"],
        f"request id {first['request_id']!r}: {first['error']}{more}; nothing was counted",
        [{k: v for k, v in p.items() if k != "reason"} for p in problems],
    )
