"""ASGI middlewares and the app the routes are mounted in: every error answered as
``{"error": ...}`` JSON, whoever raised it (our routes, Starlette, BentoML's router)."""

from __future__ import annotations

import json
import logging
from http import HTTPStatus

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Route

from serving import __version__
from serving.web import openapi, openapi_v2
from serving.web.requests import safe_text
from serving.web.responses import INTERNAL_ERROR, JSONAnswer, http_error_answer

log = logging.getLogger(__name__)

#: The OpenAPI document's ``info``.
INFO = {
    "title": "imgclf",
    "version": __version__,
    "description": "Image classification on ONNX Runtime: /predict, /predict_batch, "
    "/metadata, /feedback and the Open Inference Protocol (/v2). Errors are "
    '{"error": "..."} with a 4xx or 5xx status.',
}


def build_app(routes: list[Route]) -> Starlette:
    """The Starlette app mounted on the BentoML service: ``routes``, with Starlette's own
    errors (404, 405) as JSON."""

    async def http_error(request: Request, error: HTTPException) -> JSONAnswer:
        return http_error_answer(error)

    return Starlette(exception_handlers={HTTPException: http_error}, routes=routes)


_BODY_HEADERS = (b"content-type", b"content-length")


class PlainErrorsAsJSON:
    """ASGI middleware: BentoML's own router answers an unknown path (one with a newline in
    it, say, which no mount matches) with a plain-text 404; make every such error JSON, like
    ours. And answer an exception that nothing answered with a JSON 500 at once: BentoML's
    request timeout (the middleware around this one) waits for the first message of an
    answer, and an exception sends none, so the caller would wait out the whole timeout."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replaced = started = False

        async def json_errors(message) -> None:
            nonlocal replaced, started
            if message["type"] == "http.response.start":
                started = True
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

        try:
            await self.app(scope, receive, json_errors)
        except Exception:
            if started:
                raise  # the caller has part of an answer: only closing the connection is left
            log.exception("%s %s failed", scope.get("method"), safe_text(scope["path"]))
            await JSONAnswer({"error": INTERNAL_ERROR}, status_code=500)(scope, receive, send)


class MergeOpenAPIPaths:
    """ASGI middleware: add our routes (``openapi.paths``, the V2 routes of the model in
    service) to the JSON that ``GET /docs.json`` returns."""

    def __init__(
        self, app, max_top_k: int = 20, max_images: int = 32, served=lambda: (None, None)
    ) -> None:
        self.app = app
        self.paths = (
            openapi.paths(max_top_k, max_images)
            | openapi.explain_paths()
            | openapi.feedback_paths()
        )
        self.served = served  # () -> (model name, version), once the model is loaded

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/docs.json":
            await self.app(scope, receive, send)
            return
        start: dict = {}
        chunks: list[bytes] = []

        async def capture(message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, capture)
        body = b"".join(chunks)
        if start.get("status") == 200:
            spec = json.loads(body)
            # BentoML's info says version "None" and its own boilerplate: say what this is.
            spec["info"] = {**spec.get("info", {}), **INFO}
            spec.setdefault("paths", {}).update(self.paths)
            spec["paths"].update(openapi_v2.paths(*self.served()))
            body = json.dumps(spec).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})
