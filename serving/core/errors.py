"""Errors a user can fix, shared by the CLI (one line, non-zero exit) and the service (4xx JSON).

Each error carries an HTTP status and a ``reason`` drawn from a fixed set, so that the reason
can be a metric label without ever putting user input into a label.
"""

from __future__ import annotations

#: Every value ``ImgclfError.reason`` may take; metric labels are limited to these.
ERROR_REASONS = (
    "bad_request",
    "config",
    "data",
    "model",
    "empty",
    "too_large",
    "too_many_pixels",
    "not_an_image",
    "corrupt",
    "unsupported_media_type",
    "too_many_images",
    "bad_top_k",
    "overloaded",
    "not_found",
    "not_ready",
    "unknown_request_id",
    "duplicate_feedback",
    "unknown_label",
    "feedback_off",
    "store_unavailable",
    "unauthorized",
    "timeout",
    "cancelled",
    "internal",
)


class ImgclfError(Exception):
    """A mistake in what the user gave us: bad input, bad configuration, a missing model."""

    status_code: int = 400
    reason: str = "bad_request"

    #: More for the JSON answer besides ``error`` (which items of a list were refused, say).
    details: dict | None = None
    #: HTTP headers the answer carries (``WWW-Authenticate`` with a 401, say).
    headers: dict[str, str] | None = None

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            if reason not in ERROR_REASONS:
                raise ValueError(f"unknown error reason {reason!r}")
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class ConfigError(ImgclfError):
    """A configuration file or option that cannot be used."""

    reason = "config"


def validation_message(problem: dict) -> str:
    """One pydantic validation problem (an item of ``ValidationError.errors()``) in our
    words: its message without pydantic's "Value error, " prefix."""
    return problem["msg"].removeprefix("Value error, ")


class UnauthorizedError(ImgclfError):
    """A request to a route that needs a token, without the right one."""

    status_code = 401
    reason = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.headers = {"WWW-Authenticate": 'Bearer realm="imgclf"'}


class DataError(ImgclfError):
    """A data set that cannot be trained on: missing folder, empty class, one class only."""

    reason = "data"


class ModelError(ImgclfError):
    """A model file or directory that cannot be loaded or does not match its metadata."""

    status_code = 503
    reason = "model"


class NotFoundError(ImgclfError):
    """A model name or version this server does not serve."""

    status_code = 404
    reason = "not_found"


class InvalidImageError(ImgclfError):
    """An image that cannot be decoded or breaks a limit; ``reason`` says which."""

    reason = "corrupt"

    def __init__(self, message: str, *, reason: str = "corrupt", status_code: int = 400) -> None:
        super().__init__(message, reason=reason)
        self.status_code = status_code
