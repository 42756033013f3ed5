"""The JSON answers of our routes, encoded by orjson (several times faster than the
standard library's encoder, which Starlette's ``JSONResponse`` uses, and measured in the
request path's CPU: ``benchmarks/bench_request_stages.py``)."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse

#: Keys that are not strings (a class index) are written as strings, as the standard
#: library's encoder writes them; NumPy scalars and arrays are written as numbers.
_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


class JSONAnswer(JSONResponse):
    """``JSONResponse``, encoded by orjson. It writes no NaN (null instead), where the
    standard library's encoder, as Starlette calls it, refuses one with an error."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=_OPTIONS)
