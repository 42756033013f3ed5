"""The Open Inference Protocol over gRPC vs over HTTP vs ``/predict``, on one server, in one run.

One ``imgclf serve --grpc-port`` (default workers: one per core), digit JPEGs as binary inputs,
the same number of requests in flight for each protocol (default 32), one image a request:

- gRPC: tritonclient's ``grpc.aio`` client, BYTES input in ``raw_input_contents``, with one
  channel per worker (each with its own connection: gRPC balances connections, not calls);
- HTTP OIP: tritonclient's ``http.aio`` client, BYTES input with the binary tensor extension;
- ``/predict``: aiohttp (as tritonclient's HTTP client), the JPEG as the raw body.

Rounds alternate between the three (this machine is shared and noisy), and the table gives
the median of the rounds and each protocol's ratio to ``/predict``. The load generator is
Python and runs on the same cores as the server: its CPU per request is reported too, since
it takes from what the server gets (wrk, in ``bench_service.py``, costs far less).

    .venv/bin/python benchmarks/bench_grpc.py [--model model_repository/digits] [--seconds 10]
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
import numpy as np  # noqa: E402
import tritonclient.grpc.aio as triton_grpc  # noqa: E402
import tritonclient.http.aio as triton_http  # noqa: E402

from benchmarks.bench_service import Process, digit_jpegs, free_port  # noqa: E402
from benchmarks.common import machine, table  # noqa: E402
from serving.core.roles import resolve_model_dir  # noqa: E402
from serving.web.sizing import default_workers  # noqa: E402

BIN = Path(sys.executable).parent
MODES = ("grpc", "http_oip", "predict")


def serve(model_dir: Path, grpc_port: int) -> Process:
    port = free_port()
    command = [str(BIN / "imgclf"), "serve", "--model", str(model_dir), "--port", str(port)]
    command += ["--grpc-port", str(grpc_port)]
    return Process(command, {"IMGCLF_PROVIDER": "cpu"}, port)


async def load(mode: str, server: Process, grpc_address: str, model: str, jpegs, args) -> dict:
    """``args.concurrency`` callers for ``args.seconds``: requests/s, latency percentiles,
    errors and the load generator's CPU per request."""
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.monotonic() + args.seconds

    async def calls(send) -> None:
        index = 0
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                await send(jpegs[index % len(jpegs)])
                latencies.append(time.perf_counter() - started)
            except Exception as error:  # counted, not raised: the table says how many
                errors.append(f"{type(error).__name__}: {error}"[:200])
            index += 1

    if mode == "predict":
        # aiohttp, as tritonclient's HTTP client uses: httpx cost the load generator 8 times
        # the CPU per request, which it took from the server on these cores.
        clients = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))]
        url = server.url + "/predict"

        def sender(client):
            async def send(jpeg: bytes):
                headers = {"Content-Type": "image/jpeg"}
                async with client.post(url, data=jpeg, headers=headers) as answer:
                    answer.raise_for_status()
                    await answer.read()

            return send
    else:
        triton = triton_grpc if mode == "grpc" else triton_http
        if mode == "grpc":
            # One channel per worker, each with a connection of its own.
            options = [("grpc.use_local_subchannel_pool", 1)]
            clients = [
                triton.InferenceServerClient(grpc_address, channel_args=options)
                for _ in range(args.workers)
            ]
        else:
            clients = [triton.InferenceServerClient(server.url.removeprefix("http://"))]

        def sender(client):
            async def send(jpeg: bytes):
                tensor = triton.InferInput("image", [1, 1], "BYTES")
                tensor.set_data_from_numpy(np.array([[jpeg]], dtype=np.object_))
                await client.infer(model, [tensor])

            return send

    cpu = time.process_time()
    await asyncio.gather(
        *(calls(sender(clients[i % len(clients)])) for i in range(args.concurrency))
    )
    cpu = time.process_time() - cpu
    for client in clients:
        await client.close()
    done = len(latencies)
    ordered = sorted(latencies) or [float("nan")]
    return {
        "rps": done / args.seconds,
        "p50_ms": 1000 * ordered[len(ordered) // 2],
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "errors": len(errors),
        "client_cpu_us": 1e6 * cpu / max(1, done + len(errors)),
        "first_error": errors[0] if errors else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "model_repository" / "digits")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--workers", type=int, default=default_workers("cpu"))
    args = parser.parse_args()

    model_dir = resolve_model_dir(args.model).resolve()
    from serving.core.model_dir import load_metadata

    model = load_metadata(model_dir)["name"]
    jpegs = digit_jpegs()
    grpc_port = free_port()
    server = serve(model_dir, grpc_port)
    address = f"127.0.0.1:{grpc_port}"
    results: dict[str, list[dict]] = {mode: [] for mode in MODES}
    try:
        for mode in MODES:  # warm every path and connection once
            asyncio.run(
                load(
                    mode,
                    server,
                    address,
                    model,
                    jpegs,
                    argparse.Namespace(
                        **{
                            **vars(args),
                            "seconds": 2,
                        }
                    ),
                )
            )
        for round_ in range(args.rounds):
            order = MODES if round_ % 2 == 0 else MODES[::-1]
            for mode in order:
                results[mode].append(asyncio.run(load(mode, server, address, model, jpegs, args)))
    finally:
        server.stop()

    baseline = statistics.median(r["rps"] for r in results["predict"])
    rows = []
    for mode in MODES:
        runs = results[mode]
        rps = statistics.median(r["rps"] for r in runs)
        rows.append(
            [
                {"grpc": "OIP over gRPC", "http_oip": "OIP over HTTP", "predict": "/predict"}[mode],
                rps,
                statistics.median(r["p50_ms"] for r in runs),
                statistics.median(r["p99_ms"] for r in runs),
                sum(r["errors"] for r in runs),
                rps / baseline,
                f"{min(r['rps'] for r in runs):,.0f}-{max(r['rps'] for r in runs):,.0f}",
                statistics.median(r["client_cpu_us"] for r in runs),
            ]
        )
    print(
        f"{machine()}; {model_dir}; {args.workers} workers; concurrency {args.concurrency}; "
        f"{args.rounds} alternating rounds of {args.seconds:g} s, medians"
    )
    print(
        table(
            [
                "protocol",
                "requests/s",
                "p50 ms",
                "p99 ms",
                "errors",
                "vs /predict",
                "rounds' range",
                "load generator CPU µs/request",
            ],
            rows,
        )
    )
    for mode in MODES:
        for run in results[mode]:
            if run["first_error"]:
                print(f"{mode}: first error: {run['first_error']}")
                break


if __name__ == "__main__":
    main()
