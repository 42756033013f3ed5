"""Reading a request: the body within its size limit, the uploaded images of a multipart or
raw body, ``top_k``, and the id a prediction is answered and labelled under. Nothing is ever
fetched for a caller, and every mistake is an ``ImgclfError`` with a 4xx status.
"""

from __future__ import annotations

import os
import random
import re
import sys
import time
from dataclasses import dataclass

import orjson
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from serving.core.errors import ImgclfError, InvalidImageError
from serving.web.multipart import split_form

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
#: Starlette spools each uploaded file part over 1 MiB to a temporary file on disk, and then
#: reads it back through a thread: 4.5 ms of a 1.5 MB phone photo's request, against 0.7 ms
#: in memory. The whole body is already in memory (and bounded by max_request_bytes), so its
#: parts stay there too.
MultiPartParser.spool_max_size = sys.maxsize
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: A caller's request id we keep: no "/" (several images get "id/index"), at most 128 chars.
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
REQUEST_ID_HEADER = "X-Request-ID"
#: Random bits for new ids, without a system call per request (os.urandom costs several
#: microseconds in a sandboxed container). Ids are unique, not secret: an id is what a label
#: names, so /feedback, which drives the accuracy alerts, is guarded by its own token
#: (IMGCLF_FEEDBACK_TOKEN), not by ids being hard to guess (SECURITY.md).
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
    #: BentoML answers 504 past it (the handler sees only a cancellation).
    timeout_s: float = 30.0


def safe_text(text: str | None, limit: int = 120) -> str:
    """User-supplied text for logs and messages: no control characters, bounded length."""
    if text is None:
        return ""
    return _CONTROL.sub("?", text)[:limit]


def parse_json(body: bytes, what: str):
    """A request's JSON document. orjson refuses, while parsing, what would otherwise fail
    later as a 500: nesting deeper than 1,024 levels (the standard library recurses until
    ``RecursionError``), invalid UTF-8 and lone surrogates (``"\\ud800"``: text that cannot be
    encoded again, for a log line, the feedback store or the echoed ``id``)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise ImgclfError(f"{what} is not JSON: {safe_text(str(error), 120)}") from None


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


#: Limits of a form besides its files: text fields, and the bytes of each.
MAX_FORM_FIELDS, MAX_FIELD_BYTES = 16, 64 * 1024


async def _multipart(request: Request, body: bytes, *, field: str, limits: Limits):
    """The files of ``field`` and the text fields of a multipart body: split directly when
    it has the common shape (``serving.web.multipart``), else by Starlette's parser."""
    parts = split_form(
        body,
        request.headers.get("content-type", ""),
        max_files=limits.max_images_per_request + 1,
        max_fields=MAX_FORM_FIELDS,
        max_part_size=MAX_FIELD_BYTES,
    )
    if parts is None:
        return await _parsed_multipart(request, body, field=field, limits=limits)
    uploads, last = [], {}
    for part in parts:
        text = part.data.decode() if part.filename is None else None
        if part.name == field:
            if text is not None:
                raise ImgclfError(_NOT_A_FILE.format(field=field))
            uploads.append(Upload(part.data, part.filename))
        last[part.name] = text
    if not uploads:
        raise ImgclfError(f"no file in multipart field {field!r}", reason="empty")
    return uploads, {key: text for key, text in last.items() if text is not None}


_NOT_A_FILE = "field {field!r} must be a file upload, not text (URLs are never fetched)"


async def _parsed_multipart(request: Request, body: bytes, *, field: str, limits: Limits):
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        async with Request(request.scope, replay).form(
            max_files=limits.max_images_per_request + 1,
            max_fields=MAX_FORM_FIELDS,
            max_part_size=MAX_FIELD_BYTES,
        ) as form:
            values = form.getlist(field)
            texts = {key: value for key, value in form.items() if isinstance(value, str)}
            uploads = []
            for value in values:
                if not isinstance(value, UploadFile):
                    raise ImgclfError(_NOT_A_FILE.format(field=field))
                uploads.append(Upload(await value.read(), value.filename))
    except (MultiPartException, HTTPException) as error:  # Starlette raises either
        detail = getattr(error, "detail", None) or str(error)
        raise ImgclfError(f"malformed multipart body: {safe_text(str(detail))}") from None
    except (AssertionError, KeyError, ValueError, UnicodeDecodeError) as error:
        raise ImgclfError(f"malformed multipart body ({type(error).__name__})") from None
    if not uploads:
        raise ImgclfError(f"no file in multipart field {field!r}", reason="empty")
    return uploads, texts


def parse_top_k(request: Request, form: dict, limits: Limits) -> int:
    """``top_k`` from the query or a form field: 1 to ``max_top_k``; more than the model has
    classes returns them all."""
    raw = request.query_params.get("top_k", form.get("top_k"))
    limit = limits.max_top_k
    if raw is None:
        return limits.default_top_k
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise ImgclfError(
            f"top_k must be an integer from 1 to {limit}", reason="bad_top_k"
        ) from None
    if not 1 <= value <= limit:
        raise ImgclfError(f"top_k must be from 1 to {limit}, got {value}", reason="bad_top_k")
    return value


def request_id(request: Request | None, proposed: object = None) -> str:
    """The id a prediction is answered and labelled under: the caller's own (``proposed``,
    then ``X-Request-ID``) when it is safe to log and store, else a new random one."""
    sent = request.headers.get("x-request-id") if request is not None else None
    for candidate in (proposed, sent):
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
