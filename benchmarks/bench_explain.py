"""What ``/explain`` costs, on one server, in one run.

- latency at concurrency 1: ``/predict``, ``/explain?method=cam`` (one forward pass and the
  head's gradient) and ``/explain?method=occlusion`` (50 forward passes) of the same digit,
  alternating, medians;
- ``/predict`` throughput at concurrency 32 alone, and while ``/explain`` is called once a
  second beside it, in alternating rounds: the ratio is what an explanation costs the
  traffic (occlusion runs on a batcher of its own, one explanation at a time per worker).

    .venv/bin/python benchmarks/bench_explain.py [--model model_repository/digits] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from benchmarks.bench_service import digit_jpegs, serve  # noqa: E402
from benchmarks.common import machine, table  # noqa: E402
from serving.core.roles import resolve_model_dir  # noqa: E402

HEADERS = {"Content-Type": "image/jpeg"}


#: The routes timed one call at a time.
SINGLE = ("/predict", "/explain?method=cam", "/explain?method=occlusion")


async def latencies(url: str, jpeg: bytes, calls: int) -> dict[str, float]:
    """Median ms of each of ``SINGLE``, called one at a time, in turn."""
    seen: dict[str, list[float]] = {route: [] for route in SINGLE}
    async with aiohttp.ClientSession() as session:
        for _ in range(calls):
            for route, found in seen.items():
                started = time.perf_counter()
                async with session.post(url + route, data=jpeg, headers=HEADERS) as answer:
                    answer.raise_for_status()
                    await answer.read()
                found.append(1000 * (time.perf_counter() - started))
    return {route: statistics.median(found) for route, found in seen.items()}


async def throughput(url: str, jpegs: list[bytes], seconds: float, explaining: bool) -> float:
    """``/predict`` answers per second at concurrency 32, with ``/explain`` once a second
    beside it or not."""
    done = 0
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def caller(offset: int) -> None:
            nonlocal done
            index = offset
            while time.monotonic() < deadline:
                jpeg = jpegs[index % len(jpegs)]
                async with session.post(url + "/predict", data=jpeg, headers=HEADERS) as answer:
                    answer.raise_for_status()
                    await answer.read()
                done += 1
                index += 1

        async def explainer() -> None:
            while time.monotonic() < deadline:
                route = "/explain?method=occlusion"
                async with session.post(url + route, data=jpegs[0], headers=HEADERS) as a:
                    a.raise_for_status()
                    await a.read()
                await asyncio.sleep(1.0)

        tasks = [caller(i) for i in range(32)] + ([explainer()] if explaining else [])
        await asyncio.gather(*tasks)
    return done / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "model_repository" / "digits")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model_dir = resolve_model_dir(args.model).resolve()
    jpegs = digit_jpegs()
    server = serve(model_dir)
    rounds: dict[bool, list[float]] = {False: [], True: []}
    try:
        single = asyncio.run(latencies(server.url, jpegs[0], 50))
        for round_ in range(args.rounds):
            for explaining in (False, True) if round_ % 2 == 0 else (True, False):
                rate = asyncio.run(throughput(server.url, jpegs, args.seconds, explaining))
                rounds[explaining].append(rate)
    finally:
        server.stop()
    alone, beside = (statistics.median(rounds[flag]) for flag in (False, True))
    print(f"{machine()}; {model_dir}; default workers; medians")
    print(
        table(
            ["measure", "value"],
            [
                ["/predict at concurrency 1, ms", single["/predict"]],
                ["/explain?method=cam, ms", single[SINGLE[1]]],
                ["... / /predict", single[SINGLE[1]] / single["/predict"]],
                ["/explain?method=occlusion, ms", single[SINGLE[2]]],
                ["... / /predict", single[SINGLE[2]] / single["/predict"]],
                ["/predict at concurrency 32, requests/s", alone],
                ["... with occlusion once a second beside it", beside],
                ["throughput kept", beside / alone],
            ],
        )
    )


if __name__ == "__main__":
    main()
