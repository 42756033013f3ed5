"""The public HTTP endpoints, as a Starlette app mounted on the BentoML service.

BentoML's typed APIs cannot take a raw image body, answer errors as a JSON array and fetch
URLs sent in place of files; these routes read the request themselves: the body size is
bounded before parsing, each image is decoded and validated before it joins a batch, nothing
is ever fetched, and every user mistake is ``{"error": "..."}`` with a 4xx status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from http import HTTPStatus

import numpy as np
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving.errors import ImgclfError, InvalidImageError

log = logging.getLogger(__name__)

#: Raw-body content types we accept ("image/jpg" is wrong but common, so it is accepted too).
RAW_IMAGE_TYPES = (
    "image/jpeg",
    "image/jpg",
    "image/pjpeg",
    "image/png",
    "image/gif",
    "image/bmp",
    "image/x-ms-bmp",
    "image/webp",
    "application/octet-stream",
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: A caller's request id we keep: no "/" (several images get "id/index"), at most 128 chars.
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
REQUEST_ID_HEADER = "X-Request-ID"
#: Random bits for new ids, without a system call per request (os.urandom costs several
#: microseconds in a sandboxed container). Ids are unique, not secret: an id names a
#: prediction for its label and grants nothing.
_IDS = random.Random(os.urandom(32))


@dataclass
class Upload:
    data: bytes
    filename: str | None


@dataclass
class Limits:
    max_request_bytes: int
    max_images_per_request: int
    default_top_k: int
    max_top_k: int


class Frontend:
    """What the routes need from the service: a card to decode and format answers, a thread
    pool to decode on, the batcher to classify with, and what ``/metadata`` says."""

    def __init__(
        self,
        card,
        classify: Callable[[np.ndarray], Awaitable[np.ndarray]],
        limits: Limits,
        describe: Callable[[], dict],
        decoder: Executor,
        observer=None,
        is_ready: Callable[[], bool] = lambda: True,
        feedback=None,
    ) -> None:
        self.card = card
        #: The worker's ``serving.feedback.Feedback`` (store and metrics), or None when off.
        self.feedback = feedback
        self.is_ready = is_ready
        self.classify = classify
        self.limits = limits
        self.describe = describe
        self.decoder = decoder
        self.observer = observer

    async def decode_all(self, uploads: list[Upload]) -> np.ndarray:
        """Decode every image side by side; the first bad one fails the request, named by its
        index (and file name) when there are several."""
        if len(uploads) == 1:
            decoded = [await self.decode(uploads[0])]
        else:
            decoded = await asyncio.gather(
                *(self.decode(upload) for upload in uploads), return_exceptions=True
            )
        for index, (upload, result) in enumerate(zip(uploads, decoded, strict=True)):
            if isinstance(result, InvalidImageError) and len(uploads) > 1:
                name = f" ({safe_text(upload.filename, 60)})" if upload.filename else ""
                result.args = (f"image {index}{name}: {result.message}",)
            if isinstance(result, BaseException):
                raise result
        return np.stack(decoded)

    async def decode(self, upload: Upload) -> np.ndarray:
        """Decode and preprocess one image on the decode pool (Pillow releases the GIL)."""
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        array = await loop.run_in_executor(self.decoder, self.card.preprocess, upload.data)
        if self.observer is not None:
            self.observer.decoded(time.perf_counter() - started)
        return array


def safe_text(text: str | None, limit: int = 120) -> str:
    """User-supplied text for logs and messages: no control characters, bounded length."""
    if text is None:
        return ""
    return _CONTROL.sub("?", text)[:limit]


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ImgclfError("Content-Length is not a number") from None
        if size > limit:
            raise InvalidImageError(
                f"the request body is {size} bytes; the limit is {limit}",
                reason="too_large",
                status_code=413,
            )
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise InvalidImageError(
                f"the request body exceeds the limit of {limit} bytes",
                reason="too_large",
                status_code=413,
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def read_uploads(request: Request, *, field: str, limits: Limits, raw_allowed: bool):
    """The uploaded images and the text form fields of a request."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await read_body(request, limits.max_request_bytes)
    if media_type == "multipart/form-data":
        return await _multipart(request, body, field=field, limits=limits)
    if media_type in RAW_IMAGE_TYPES or (raw_allowed and media_type.startswith("image/")):
        if not raw_allowed:
            raise InvalidImageError(
                f"send several images as multipart/form-data fields named {field!r}",
                reason="unsupported_media_type",
                status_code=415,
            )
        return [Upload(body, None)], {}
    accepted = "multipart/form-data" + (", " + ", ".join(RAW_IMAGE_TYPES) if raw_allowed else "")
    shown = safe_text(media_type) or "none"
    raise InvalidImageError(
        f"unsupported Content-Type {shown}; send {accepted}",
        reason="unsupported_media_type",
        status_code=415,
    )


async def _multipart(request: Request, body: bytes, *, field: str, limits: Limits):
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        async with Request(request.scope, replay).form(
            max_files=limits.max_images_per_request + 1, max_fields=16, max_part_size=64 * 1024
        ) as form:
            values = form.getlist(field)
            texts = {key: value for key, value in form.items() if isinstance(value, str)}
            uploads = []
            for value in values:
                if not isinstance(value, UploadFile):
                    raise ImgclfError(
                        f"field {field!r} must be a file upload, not text (URLs are never fetched)"
                    )
                uploads.append(Upload(await value.read(), value.filename))
    except (MultiPartException, HTTPException) as error:  # Starlette raises either
        detail = getattr(error, "detail", None) or str(error)
        raise ImgclfError(f"malformed multipart body: {safe_text(str(detail))}") from None
    except (AssertionError, KeyError, ValueError, UnicodeDecodeError) as error:
        raise ImgclfError(f"malformed multipart body ({type(error).__name__})") from None
    if not uploads:
        raise ImgclfError(f"no file in multipart field {field!r}", reason="empty")
    return uploads, texts


def parse_top_k(request: Request, form: dict, frontend: Frontend) -> int:
    """``top_k`` from the query or a form field: 1 to ``max_top_k``; more than the model has
    classes returns them all."""
    raw = request.query_params.get("top_k", form.get("top_k"))
    limit = frontend.limits.max_top_k
    if raw is None:
        return frontend.limits.default_top_k
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise ImgclfError(
            f"top_k must be an integer from 1 to {limit}", reason="bad_top_k"
        ) from None
    if not 1 <= value <= limit:
        raise ImgclfError(f"top_k must be from 1 to {limit}, got {value}", reason="bad_top_k")
    return value


def request_id(request: Request, proposed: object = None) -> str:
    """The id a prediction is answered and labelled under: the caller's own (``proposed``,
    then ``X-Request-ID``) when it is safe to log and store, else a new random one."""
    for candidate in (proposed, request.headers.get("x-request-id")):
        if isinstance(candidate, str) and _SAFE_ID.fullmatch(candidate):
            return candidate
    return uuid7_hex()


def uuid7_hex() -> str:
    """A UUIDv7 (RFC 9562: 48 bits of Unix milliseconds, then 74 random bits) as 32 hex
    digits. Time-ordered ids land at the end of the feedback store's index, so storing one
    costs a few microseconds at any store size; random ids (UUIDv4) cost up to 20 as the
    index outgrows the cache."""
    rand = _IDS.getrandbits(74)
    value = (
        (time.time_ns() // 1_000_000 & 0xFFFF_FFFF_FFFF) << 80
        | 0x7 << 76
        | (rand >> 62) << 64
        | 0b10 << 62
        | rand & 0x3FFF_FFFF_FFFF_FFFF
    )
    return f"{value:032x}"


def prediction_ids(frontend: Frontend, rid: str, probabilities: np.ndarray) -> list[str]:
    """One id per image (the request's own for one image, ``id/index`` for several), each
    kept with its predicted class for ``POST /feedback``."""
    if len(probabilities) == 1:
        ids = [rid]
    else:
        ids = [f"{rid}/{index}" for index in range(len(probabilities))]
    if frontend.feedback is not None:
        frontend.feedback.store.remember(ids, np.asarray(probabilities).argmax(axis=1).tolist())
    return ids


async def predict_uploads(frontend: Frontend, uploads: list[Upload], top_k: int, rid: str):
    """Decode every image (a bad one fails this request alone), then classify them in one
    batch with whatever else is queued."""
    card = frontend.card
    probabilities = np.asarray(await frontend.classify(await frontend.decode_all(uploads)))
    ids = prediction_ids(frontend, rid, probabilities)
    return [
        {
            "label": best[0]["label"],
            "score": best[0]["score"],
            "top_k": best,
            "model_version": card.version,
            "request_id": image_id,
        }
        for best, image_id in zip(card.top_k(probabilities, top_k), ids, strict=True)
    ]


async def handle(request: Request, endpoint: str, work) -> Response:
    """Run ``work(frontend)`` for ``endpoint``: its result (a Response, or JSON content), or
    ``{"error": ...}`` with the error's status; every outcome counted by endpoint."""
    frontend = getattr(request.app.state, "frontend", None)
    if frontend is None:
        return JSONResponse(
            {"error": "the service is starting"}, status_code=503, headers={"Retry-After": "1"}
        )
    started = time.perf_counter()
    try:
        result = await work(frontend)
        response = result if isinstance(result, Response) else JSONResponse(result)
        if frontend.observer is not None:
            frontend.observer.request(endpoint, response.status_code, time.perf_counter() - started)
        return response
    except ImgclfError as error:
        reason, status, message = error.reason, error.status_code, error.message
        details = error.details or {}
        log.info("%s rejected (%s): %s", endpoint, reason, safe_text(message, 300))
    except Exception:
        log.exception("%s failed", endpoint)
        reason, status, message = "internal", 500, "internal error; see the server log"
        details = {}
    if frontend.observer is not None:
        frontend.observer.error(endpoint, reason)
        frontend.observer.request(endpoint, status, time.perf_counter() - started)
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"error": message, **details}, status_code=status, headers=headers)


def build_app() -> Starlette:
    """The Starlette app. The service puts its ``Frontend`` in ``app.state.frontend`` when it
    is constructed (each worker process holds one service)."""

    async def predict(request: Request) -> JSONResponse:
        async def work(frontend: Frontend):
            uploads, form = await read_uploads(
                request, field="image", limits=frontend.limits, raw_allowed=True
            )
            if len(uploads) > 1:
                raise ImgclfError(
                    "send one image to /predict (several: /predict_batch)",
                    reason="too_many_images",
                )
            top_k = parse_top_k(request, form, frontend)
            rid = request_id(request)
            answer = (await predict_uploads(frontend, uploads, top_k, rid))[0]
            return JSONResponse(answer, headers={REQUEST_ID_HEADER: rid})

        return await handle(request, "predict", work)

    async def predict_batch(request: Request) -> JSONResponse:
        async def work(frontend: Frontend):
            uploads, form = await read_uploads(
                request, field="images", limits=frontend.limits, raw_allowed=False
            )
            if len(uploads) > frontend.limits.max_images_per_request:
                raise ImgclfError(
                    f"{len(uploads)} images in one request; the limit is "
                    f"{frontend.limits.max_images_per_request}",
                    reason="too_many_images",
                )
            top_k = parse_top_k(request, form, frontend)
            rid = request_id(request)
            answers = await predict_uploads(frontend, uploads, top_k, rid)
            return JSONResponse(answers, headers={REQUEST_ID_HEADER: rid})

        return await handle(request, "predict_batch", work)

    async def metadata(request: Request) -> JSONResponse:
        async def work(frontend: Frontend):
            return {**frontend.describe(), "limits": vars(frontend.limits)}

        return await handle(request, "metadata", work)

    from serving.feedback import feedback_routes

    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse(
            {"error": error.detail}, status_code=error.status_code, headers=error.headers
        )

    from serving.oip import oip_routes  # the V2 and feedback routes share this module's handling

    return Starlette(
        exception_handlers={HTTPException: http_error},
        routes=[
            Route("/predict", predict, methods=["POST"]),
            Route("/predict_batch", predict_batch, methods=["POST"]),
            Route("/metadata", metadata, methods=["GET"]),
            *oip_routes(),
            *feedback_routes(),
        ],
    )


_BODY_HEADERS = (b"content-type", b"content-length")


class PlainErrorsAsJSON:
    """ASGI middleware: BentoML's own router answers an unknown path (one with a newline in
    it, say, which no mount matches) with a plain-text 404; make every such error JSON, like
    ours."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replaced = False

        async def json_errors(message) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start":
                headers = message.get("headers", [])
                plain = dict(headers).get(b"content-type", b"").startswith(b"text/plain")
                if message["status"] in (404, 405) and plain:
                    replaced = True
                    body = json.dumps({"error": HTTPStatus(message["status"]).phrase}).encode()
                    await send(
                        {
                            **message,
                            "headers": [
                                *(h for h in headers if h[0] not in _BODY_HEADERS),
                                (b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                            ],
                        }
                    )
                    await send({"type": "http.response.body", "body": body})
                    return
            elif replaced:
                return  # the plain-text body
            await send(message)

        await self.app(scope, receive, json_errors)
