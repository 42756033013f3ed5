"""A multipart/form-data body of the common shape, split without a streaming parser.

Starlette parses a form with python-multipart, a streaming parser that calls back into
Python for every header and every chunk, and parses each part's headers again: about 90 µs
of the event loop's CPU for one digit upload (``benchmarks/bench_request_stages.py``). Our
routes read the whole body first (it is bounded), so the common body, the one every HTTP
client library sends (``--boundary``, a ``Content-Disposition: form-data; name="..."``
with or without a ``filename``, an optional ``Content-Type``, the data), can be split with
``bytes`` methods. Anything else, or anything over a limit, returns None, and Starlette's
parser reads the body (with its own errors for what is malformed): this never answers
differently, only faster (``tests/serving/web/test_multipart.py`` compares the two).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BOUNDARY = re.compile(r';\s*boundary=("?)([0-9A-Za-z\'()+_,\-./:=? ]{1,70})\1\s*$', re.I)
_DISPOSITION = re.compile(rb'form-data; ?name="([^"\\]*)"(?:; ?filename="([^"\\]*)")?')
#: The part headers the common shape has; any other (a transfer encoding) takes the parser.
_KNOWN_HEADERS = (b"content-disposition", b"content-type")


@dataclass
class Part:
    name: str
    #: The file's name for a file part (possibly ""), None for a text field.
    filename: str | None
    data: bytes


def split_form(
    body: bytes, content_type: str, *, max_files: int, max_fields: int, max_part_size: int
) -> list[Part] | None:
    """The parts of ``body``, in order, or None when it is not of the common shape or a part
    passes a limit (``max_part_size`` bounds a text field, as Starlette's does)."""
    found = _BOUNDARY.search(content_type)
    if found is None:
        return None
    delimiter = b"--" + found.group(2).encode()
    close = b"\r\n" + delimiter + b"--"
    end = body.rfind(close)
    if not body.startswith(delimiter + b"\r\n") or end < 0:
        return None
    if body[end + len(close) :] not in (b"", b"\r\n"):
        return None
    inner = body[len(delimiter) + 2 : end]
    chunks = inner.split(b"\r\n" + delimiter + b"\r\n")
    if body.count(b"\r\n" + delimiter) != len(chunks):
        return None  # a delimiter followed by something else: let the parser judge it
    parts, files, fields = [], 0, 0
    for chunk in chunks:
        part = _part(chunk)
        if part is None:
            return None
        if part.filename is None:
            fields += 1
            if len(part.data) > max_part_size:
                return None
        else:
            files += 1
        if files > max_files or fields > max_fields:
            return None
        parts.append(part)
    return parts


def _part(chunk: bytes) -> Part | None:
    head, separator, data = chunk.partition(b"\r\n\r\n")
    if not separator or not head.isascii():
        return None
    disposition = None
    for line in head.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        name = name.lower()
        if not colon or name not in _KNOWN_HEADERS:
            return None
        if name == b"content-disposition":
            if disposition is not None:
                return None
            disposition = _DISPOSITION.fullmatch(value.strip())
            if disposition is None:
                return None
    if disposition is None:
        return None
    field, filename = disposition.group(1).decode(), disposition.group(2)
    if filename is None:
        try:
            data.decode()
        except UnicodeDecodeError:
            return None
        return Part(field, None, data)
    return Part(field, filename.decode(), data)
