"""The JSON answers of our routes, encoded by orjson (several times faster than the
standard library's encoder, which Starlette's ``JSONResponse`` uses, and measured in the
request path's CPU: ``benchmarks/bench_request_stages.py``)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

#: Keys that are not strings (a class index) are written as strings, as the standard
#: library's encoder writes them; NumPy scalars and arrays are written as numbers.
_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY
#: What a caller is told of a failure that is ours, not theirs (the log has the rest).
INTERNAL_ERROR = "internal error; see the server log"


def json_bytes(content: Any) -> bytes:
    """``content`` as our answers encode it (``JSONAnswer``, and the JSON head of a binary
    Open Inference Protocol answer)."""
    return orjson.dumps(content, option=_OPTIONS)


class JSONAnswer(JSONResponse):
    """``JSONResponse``, encoded by orjson. It writes no NaN (null instead), where the
    standard library's encoder, as Starlette calls it, refuses one with an error."""

    def render(self, content: Any) -> bytes:
        return json_bytes(content)


def http_error_answer(error: HTTPException) -> JSONAnswer:
    """Starlette's ``HTTPException`` (a 404, a 405 and their headers) as our JSON error."""
    return JSONAnswer({"error": error.detail}, status_code=error.status_code, headers=error.headers)
