"""The hot path (``serving.web.hot_path``): our routes answered past BentoML's middleware,
with what that middleware did for them (timeout, concurrency limit, drain, JSON errors), and
everything else handed to BentoML's app. The real servers of the other tests run behind it;
here each duty is checked on its own, and a real server with BentoML's metrics asked for
shows that the setting takes our routes back through BentoML's app."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import pytest
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.routing import Route

from serving.web.hot_path import HotPath, hot_path_off_reason, per_worker
from serving.web.lifecycle import DRAINING, Lifecycle
from tests.serving.cases import digit, encode
from tests.serving.conftest import Server
from tests.serving.web.test_hostile_callers import sample

TIMEOUT_S = 0.3


class Endpoints:
    """Endpoints that say what they saw; ``/hold`` waits for ``release``."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.cancelled = 0
        self.in_flight_seen: list[int] = []

    def routes(self, lifecycle: Lifecycle) -> list[Route]:
        async def predict(request):
            self.in_flight_seen.append(lifecycle.in_flight)
            return JSONResponse({"path": request.url.path, "body": (await request.body()).decode()})

        async def infer(request):
            return JSONResponse({"model": request.path_params["name"]})

        async def hold(request):
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            return JSONResponse({"held": True})

        async def boom(request):
            raise RuntimeError("a bug")

        async def teapot(request):
            raise HTTPException(418, "short and stout")

        return [
            Route("/predict", predict, methods=["POST"]),
            Route("/v2/models/{name}/infer", infer, methods=["POST"]),
            Route("/hold", hold, methods=["POST"]),
            Route("/boom", boom, methods=["POST"]),
            Route("/teapot", teapot, methods=["POST"]),
        ]


async def behind(scope, receive, send) -> None:
    """BentoML's app, as far as these tests need it: it says it answered."""
    await JSONResponse({"behind": scope["path"]}, status_code=299)(scope, receive, send)


def hot_path(max_concurrency: int | None = None):
    lifecycle = Lifecycle()
    endpoints = Endpoints()
    app = HotPath(
        behind,
        endpoints.routes(lifecycle),
        lifecycle,
        timeout_s=TIMEOUT_S,
        max_concurrency=max_concurrency,
    )
    return app, lifecycle, endpoints


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def run(coroutine):
    return asyncio.run(coroutine)


def test_our_routes_are_answered_directly_and_the_rest_behind():
    app, lifecycle, endpoints = hot_path()

    async def calls():
        async with client(app) as http:
            return [
                await http.post("/predict", content=b"seven"),
                await http.post("/v2/models/digits/infer"),
                await http.get("/predict"),  # a method the route lacks: BentoML's 405
                await http.get("/metrics"),
                await http.post("/predict/"),
            ]

    predict, infer, wrong_method, metrics, slash = run(calls())
    assert predict.status_code == 200
    assert predict.json() == {"path": "/predict", "body": "seven"}
    assert infer.json() == {"model": "digits"}
    for answer, path in ((wrong_method, "/predict"), (metrics, "/metrics"), (slash, "/predict/")):
        assert (answer.status_code, answer.json()) == (299, {"behind": path})
    assert endpoints.in_flight_seen == [1]
    assert lifecycle.in_flight == 0


def test_a_request_past_the_timeout_is_cancelled_and_answered_504():
    app, lifecycle, endpoints = hot_path()

    async def call():
        async with client(app) as http:
            return await http.post("/hold")

    answer = run(call())
    assert answer.status_code == 504
    assert answer.json() == {"error": f"Not able to process the request in {TIMEOUT_S} seconds"}
    assert endpoints.cancelled == 1
    assert lifecycle.in_flight == 0


def test_past_the_concurrency_limit_a_request_is_refused_429():
    app, lifecycle, endpoints = hot_path(max_concurrency=1)

    async def calls():
        async with client(app) as http:
            held = asyncio.create_task(http.post("/hold"))
            while lifecycle.in_flight < 1:
                await asyncio.sleep(0.01)
            refused = await http.post("/predict", content=b"x")
            probe = await http.get("/metrics")  # not ours: never limited here
            endpoints.release.set()
            return await held, refused, probe

    held, refused, probe = run(calls())
    assert held.json() == {"held": True}
    assert (refused.status_code, refused.json()) == (429, {"error": "Too many requests"})
    assert probe.status_code == 299
    assert app.active == 0


def test_errors_are_json_and_a_bug_is_a_500():
    app, _, _ = hot_path()

    async def calls():
        async with client(app) as http:
            return await http.post("/boom"), await http.post("/teapot")

    boom, teapot = run(calls())
    assert (boom.status_code, boom.json()) == (500, {"error": "internal error; see the server log"})
    assert (teapot.status_code, teapot.json()) == (418, {"error": "short and stout"})


def test_while_draining_every_answer_closes_its_connection():
    app, lifecycle, _ = hot_path()

    async def call():
        async with client(app) as http:
            return await http.post("/predict", content=b"x")

    assert run(call()).headers.get("connection") is None
    lifecycle.set(DRAINING)
    assert run(call()).headers["connection"] == "close"


def test_what_asks_for_bentomls_middleware_turns_the_hot_path_off():
    plain = SimpleNamespace(bentoml_metrics=False, tracing=False, access_log=False)
    assert hot_path_off_reason(plain, cors=False) is None
    for name, variable in (
        ("bentoml_metrics", "IMGCLF_BENTOML_METRICS"),
        ("tracing", "IMGCLF_TRACING"),
        ("access_log", "IMGCLF_ACCESS_LOG"),
    ):
        reason = hot_path_off_reason(SimpleNamespace(**{**vars(plain), name: True}), cors=False)
        assert variable in reason
    assert "CORS" in hot_path_off_reason(plain, cors=True)
    assert per_worker(None, 2) is None
    assert per_worker(5, 2) == 3  # as BentoML shares a server's limit


@pytest.mark.parametrize("bentoml_metrics", [False, True], ids=["ours", "bentoml_metrics"])
def test_a_real_server_counts_predict_in_bentomls_metrics_only_when_asked(
    published_model, bentoml_metrics
):
    image = encode(digit(4, 0), "PNG")
    env = {"IMGCLF_BENTOML_METRICS": "true"} if bentoml_metrics else {}
    with (
        Server(published_model, env=env, args=("--workers", "1")) as server,
        server.client() as api,
    ):
        answers = [
            api.post("/predict", content=image, headers={"Content-Type": "image/png"})
            for _ in range(3)
        ]
        assert [answer.status_code for answer in answers] == [200] * 3
        assert sample(api, "imgclf_requests_total", endpoint="predict") == 3
        theirs = sample(api, "bentoml_service_request_total", endpoint="/predict")
        assert theirs == (3 if bentoml_metrics else None)
        assert sample(api, "imgclf_requests_in_progress") == 0
