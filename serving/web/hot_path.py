"""Our routes' own way in: uvicorn hands a request for one of our routes straight to its
endpoint; everything else (``/livez``, ``/readyz``, ``/metrics``, ``/docs.json``, unknown
paths) takes BentoML's app as before.

Between uvicorn and our endpoints BentoML's app runs about twenty ASGI layers for every
request: its metrics (a labelled histogram, counter and gauge per request, each a locked
write to a memory-mapped file), the OpenTelemetry middleware (even with every URL excluded),
a timeout that starts a task and a timer per request, its context, its router and our
mount's own Starlette app. ``benchmarks/bench_request_stages.py`` measured those layers at a
third of the event loop's CPU per request. This path keeps what they do for our routes,
each once: the request timeout (``asyncio.timeout``: a 504 as BentoML's says it), the
concurrency limit (a 429, as BentoML's per-worker share), in-flight counting and the drain's
``Connection: close`` (``serving.web.lifecycle``), and a JSON 500 for what nothing answered.

What it leaves out, so it is off (``hot_path_off_reason``) when any of it is wanted: BentoML's
``bentoml_service_request_*`` metrics for our routes (``IMGCLF_BENTOML_METRICS``; ours are
``imgclf_requests_total``, ``imgclf_request_duration_seconds`` and
``imgclf_requests_in_progress``), tracing (``IMGCLF_TRACING``), BentoML's access log
(``IMGCLF_ACCESS_LOG``), and CORS from BentoML's configuration.
"""

from __future__ import annotations

import asyncio
import logging
import math

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Match, Route

from serving.web.lifecycle import Lifecycle
from serving.web.requests import safe_text
from serving.web.responses import INTERNAL_ERROR, JSONAnswer, http_error_answer

log = logging.getLogger(__name__)


class HotPath:
    """ASGI app: ``routes`` answered directly (see the module), anything else by ``app``."""

    def __init__(
        self,
        app,
        routes: list[Route],
        lifecycle: Lifecycle,
        *,
        timeout_s: float,
        max_concurrency: int | None = None,
    ) -> None:
        self.app = app
        #: Routes without path parameters, by path: one dictionary lookup for /predict.
        self.exact = {route.path: route for route in routes if "{" not in route.path}
        self.patterned = [route for route in routes if "{" in route.path]
        self.lifecycle = lifecycle
        self.timeout_s = timeout_s
        self.max_concurrency = max_concurrency
        self.active = 0

    def route(self, scope) -> Route | None:
        """The route that fully matches (path and method), its path parameters put in
        ``scope``; None for anything else, which BentoML's app answers (a wrong method
        there gets its 405, an unknown path its 404)."""
        path = scope["path"]
        exact = self.exact.get(path)
        for route in (exact,) if exact is not None else self.patterned:
            match, child = route.matches(scope)
            if match is Match.FULL:
                scope.update(child)
                return route
        return None

    async def __call__(self, scope, receive, send) -> None:
        route = self.route(scope) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        if self.max_concurrency is not None and self.active >= self.max_concurrency:
            await JSONAnswer({"error": "Too many requests"}, status_code=429)(scope, receive, send)
            return
        self.active += 1
        try:
            with self.lifecycle.serving(send) as answer:
                response = await self.answer(route, Request(scope, receive, answer))
                await response(scope, receive, answer)
        finally:
            self.active -= 1

    async def answer(self, route: Route, request: Request):
        """The endpoint's response, or the JSON error that BentoML's app would have sent."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await route.endpoint(request)
        except TimeoutError:  # our handlers count it (serving.web.context.handle)
            message = f"Not able to process the request in {self.timeout_s} seconds"
            return JSONAnswer({"error": message}, status_code=504)
        except HTTPException as error:
            return http_error_answer(error)
        except Exception:
            log.exception("%s %s failed", request.method, safe_text(request.url.path))
            return JSONAnswer({"error": INTERNAL_ERROR}, status_code=500)


def around_bentoml(settings, routes: list[Route], lifecycle: Lifecycle, workers: int):
    """What the worker's HTTP protocol calls its app through (``serving.web.http_limits``):
    BentoML's app, with ``routes`` on the hot path unless something asks for BentoML's own
    middleware (then the app itself, and one log line saying why)."""

    def around(app):
        off = hot_path_off_reason(settings, cors=bentoml_cors())
        if off is not None:
            log.info("every request takes BentoML's whole app: %s", off)
            return app
        limit = per_worker(settings.max_concurrency, workers)
        return HotPath(app, routes, lifecycle, timeout_s=settings.timeout_s, max_concurrency=limit)

    return around


def bentoml_cors() -> bool:
    """Whether BentoML's configuration turns CORS on (its middleware answers preflights and
    adds headers, which the hot path would skip)."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return bool(BentoMLContainer.http.cors.enabled.get())


def hot_path_off_reason(settings, cors: bool) -> str | None:
    """Why our routes must take BentoML's whole app (what it would leave out is wanted), or
    None."""
    wanted = {
        "IMGCLF_BENTOML_METRICS": settings.bentoml_metrics,
        "IMGCLF_TRACING": settings.tracing,
        "IMGCLF_ACCESS_LOG": settings.access_log,
        "CORS in BentoML's configuration": cors,
    }
    on = [name for name, value in wanted.items() if value]
    return ", ".join(on) + " asked for BentoML's own middleware" if on else None


def per_worker(max_concurrency: int | None, workers: int) -> int | None:
    """A server's concurrency limit, each worker's share of it, as BentoML shares it."""
    return math.ceil(max_concurrency / workers) if max_concurrency else None
