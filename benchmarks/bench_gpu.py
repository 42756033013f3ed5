"""GPU check and benchmark: one command for a machine with an NVIDIA GPU (CUDA 13).

    pip install -c constraints.txt -e '.[gpu,dev]'
    python benchmarks/bench_gpu.py --digits model_repository/digits --mobilenet DIR

Checks and prints, for the digits model and a MobileNetV2 at 224x224 (export one with
``imgclf train --dataset digits --arch mobilenetv2 --weights none --image-size 224
--epochs 1 -o runs/mnv2 && imgclf export runs/mnv2 --name mobilenetv2``), CPU and CUDA
side by side in one run:

1. CUDA actually in use (the session's provider, read back, not asked for);
2. CPU vs CUDA parity on real images, with TF32 on (the default) and off: max |difference|
   and top-1 agreement;
3. ONNX Runtime alone, images/s at batch 1 and 64 and on **mixed batch sizes** (the
   sequence a loaded batcher produces: a different bucket almost every call), for one
   shared session and for one session per bucket. A loop over one shape hides what a shape
   change costs a CUDA session (~0.5 s for MobileNetV2);
4. the ceiling a server could reach: the server's default worker processes, each decoding
   photo JPEGs on its decode threads and classifying batches of 64, no HTTP;
5. ``imgclf serve`` (default settings) under 64 concurrent photo-sized JPEG uploads (160-420
   px, cut from real photographs) on each provider: requests/s, p50/p99, every status code,
   the ratio to the ceiling and CUDA's ratio to the CPU;
6. the targets: on CUDA no non-200 answer, MobileNetV2 at least 1.5x the CPU's requests/s
   with p99 under 100 ms, and the digits model at least as fast as on the CPU.

Without a GPU (or without onnxruntime-gpu) the CPU half runs and the CUDA half is skipped
with a line that says so.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from benchmarks.bench_service import BIN, Process, digit_jpegs, free_port  # noqa: E402
from benchmarks.common import (  # noqa: E402
    machine,
    mixed_batch_sizes,
    photo_jpegs,
    table,
    time_mixed,
)
from serving.core.roles import resolve_model_dir  # noqa: E402
from serving.core.runtime import ClassifierRuntime  # noqa: E402
from serving.core.sessions import CUDA, CudaOptions  # noqa: E402
from serving.web.sizing import default_decode_threads, default_workers  # noqa: E402

PROVIDERS = ("cpu", "cuda")
SESSION_MODES = ("shared", "per-bucket")


def cuda_available() -> tuple[bool, str]:
    """Whether a CUDA session can be made here, and why not."""
    if CUDA not in ort.get_available_providers():
        return False, "this onnxruntime has no CUDAExecutionProvider (install the gpu extra)"
    return True, ""


def runtime_for(
    model_dir: Path, provider: str, session_mode: str = "auto", tf32: bool = True
) -> ClassifierRuntime:
    runtime = ClassifierRuntime(
        model_dir, provider=provider, session_mode=session_mode, cuda=CudaOptions(tf32=tf32)
    )
    runtime.warm_up()  # every bucket, as the service does before /readyz is 200
    return runtime


def parity(cpu: ClassifierRuntime, cuda: ClassifierRuntime, jpegs: list[bytes]) -> tuple:
    images = np.stack([cpu.preprocess(data) for data in jpegs])
    expected, actual = cpu.predict(images), cuda.predict(images)
    agreement = float((expected.argmax(1) == actual.argmax(1)).mean())
    return float(np.abs(expected - actual).max()), agreement


def runtime_rows(name: str, model_dir: Path, provider: str, jpegs: list[bytes], seconds: float):
    """ONNX Runtime alone, per session mode: one shape per loop, then mixed batch sizes."""
    rows = []
    sizes = mixed_batch_sizes(256, 64)
    for mode in SESSION_MODES:
        runtime = runtime_for(model_dir, provider, mode)
        images = np.stack([runtime.preprocess(jpegs[i % len(jpegs)]) for i in range(64)])
        one = time_mixed(runtime.predict, images, [1], seconds)
        full = time_mixed(runtime.predict, images, [64], seconds)
        mixed = time_mixed(runtime.predict, images, sizes, seconds)
        rows.append(
            [
                name,
                provider,
                mode,
                one["images_per_s"],
                full["images_per_s"],
                mixed["images_per_s"],
                mixed["p50_ms"],
                mixed["p99_ms"],
            ]
        )
        del runtime
    return rows


def _ceiling_worker(model_dir, provider, ort_threads, decode_threads, jpegs, seconds, start, out):
    runtime = ClassifierRuntime(model_dir, provider=provider, intra_op_threads=ort_threads)
    runtime.warm_up()
    batch = [jpegs[i % len(jpegs)] for i in range(64)]
    start.wait()  # every worker warmed: the timed windows overlap
    with ThreadPoolExecutor(decode_threads) as pool:
        done, started = 0, time.perf_counter()
        pending = pool.map(runtime.preprocess, batch)
        while time.perf_counter() - started < seconds:
            images = np.stack(list(pending))
            pending = pool.map(runtime.preprocess, batch)  # the next batch decodes meanwhile
            runtime.predict(images)
            done += len(images)
        out.put((done, time.perf_counter() - started))


def ceiling(model_dir: Path, provider: str, jpegs: list[bytes], seconds: float = 5.0) -> float:
    """What the server's default processes could reach without HTTP: each worker decodes on
    its own threads and classifies batches of 64 (a full batcher). Images/s, all together."""
    workers = default_workers(provider)
    decode_threads = default_decode_threads(provider, workers)
    ort_threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    start, out = context.Barrier(workers), context.Queue()
    processes = [
        context.Process(
            target=_ceiling_worker,
            args=(model_dir, provider, ort_threads, decode_threads, jpegs, seconds, start, out),
        )
        for _ in range(workers)
    ]
    for process in processes:
        process.start()
    results = [out.get(timeout=600) for _ in processes]
    for process in processes:
        process.join()
    return sum(done for done, _ in results) / max(elapsed for _, elapsed in results)


async def _client_loop(url: str, jpegs: list[bytes], connections: int, seconds: float):
    import aiohttp

    statuses: Counter = Counter()
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def one_connection(offset: int) -> None:
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            index = offset
            while time.perf_counter() < deadline:
                form = aiohttp.FormData()
                form.add_field(
                    "image", jpegs[index % len(jpegs)], filename="p.jpg", content_type="image/jpeg"
                )
                index += 1
                started = time.perf_counter()
                try:
                    async with session.post(url + "/predict", data=form) as response:
                        await response.read()
                        statuses[str(response.status)] += 1
                except aiohttp.ClientError as error:
                    statuses[type(error).__name__] += 1
                latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(one_connection(i) for i in range(connections)))
    return statuses, latencies


def _client_process(args) -> tuple[Counter, list[float]]:
    return asyncio.run(_client_loop(*args))


def load(url: str, jpegs: list[bytes], connections: int = 64, seconds: float = 30.0) -> dict:
    """``connections`` concurrent uploads from several client processes (one Python process
    cannot generate GPU-scale load)."""
    processes = max(1, min(8, (os.cpu_count() or 2) // 2, connections))
    shares = [connections // processes + (i < connections % processes) for i in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        results = pool.map(_client_process, [(url, jpegs, n, seconds) for n in shares])
    statuses: Counter = Counter()
    latencies: list[float] = []
    for counts, times in results:
        statuses.update(counts)
        latencies += times
    latencies.sort()
    total = sum(statuses.values())
    return {
        "rps": total / seconds,
        "p50": 1000 * latencies[len(latencies) // 2] if latencies else float("nan"),
        "p99": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else float("nan"),
        "statuses": dict(sorted(statuses.items())),
        "not_200": total - statuses.get("200", 0),
    }


def serve_and_load(model_dir: Path, provider: str, jpegs: list[bytes], seconds: float) -> dict:
    port = free_port()
    server = Process(
        [str(BIN / "imgclf"), "serve", "--model", str(model_dir), "--port", str(port)],
        {"IMGCLF_PROVIDER": provider},
        port,
    )
    try:
        load(server.url, jpegs, 64, 3)  # warm the connections and the pools
        return load(server.url, jpegs, 64, seconds)
    finally:
        server.stop()


def targets(served: dict) -> list[list]:
    """The issue's acceptance lines, from the HTTP results: [check, measured, verdict]."""
    rows = []
    for name, by_provider in served.items():
        if "cuda" not in by_provider:
            continue
        cpu, cuda = by_provider["cpu"], by_provider["cuda"]
        ratio = cuda["rps"] / cpu["rps"] if cpu["rps"] else float("inf")
        rows.append([f"{name}: CUDA non-200 answers", cuda["not_200"], cuda["not_200"] == 0])
        if name.startswith("mobilenet"):
            rows.append([f"{name}: CUDA / CPU requests/s >= 1.5", f"{ratio:.2f}", ratio >= 1.5])
            rows.append([f"{name}: CUDA p99 < 100 ms", f"{cuda['p99']:.0f}", cuda["p99"] < 100])
        else:
            rows.append([f"{name}: CUDA / CPU requests/s >= 1", f"{ratio:.2f}", ratio >= 1.0])
    return [[check, measured, "ok" if good else "MISSED"] for check, measured, good in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", type=Path, default=ROOT / "model_repository" / "digits")
    parser.add_argument("--mobilenet", type=Path, help="A MobileNetV2 224x224 model directory.")
    parser.add_argument("--seconds", type=float, default=30.0, help="HTTP load per provider.")
    parser.add_argument(
        "--runtime-seconds", type=float, default=3.0, help="Per ONNX Runtime measurement."
    )
    parser.add_argument("--skip-http", action="store_true", help="ONNX Runtime alone only.")
    args = parser.parse_args()

    has_cuda, why_not = cuda_available()
    providers = PROVIDERS if has_cuda else ("cpu",)
    print(f"machine: {machine()}; onnxruntime {ort.__version__}")
    if not has_cuda:
        print(f"CUDA half SKIPPED: {why_not}. Only the CPU numbers below were measured.")
    models = {"digits": args.digits}
    if args.mobilenet is not None:
        models["mobilenetv2-224"] = args.mobilenet
    else:
        print("MobileNetV2 SKIPPED: pass --mobilenet DIR (see this script's docstring).")

    photos = photo_jpegs(64)
    digits = digit_jpegs(64, size=256)
    runtime_table, ceilings, checks = [], {}, []
    served: dict[str, dict] = {}
    for name, location in models.items():
        model_dir = resolve_model_dir(location).resolve()
        if has_cuda:
            cpu = runtime_for(model_dir, "cpu")
            cuda = runtime_for(model_dir, "cuda")
            checks.append(f"{name}: CUDA session runs on {cuda.provider}, {cuda.summary()}")
            for tf32 in (True, False):
                other = cuda if tf32 else runtime_for(model_dir, "cuda", tf32=False)
                jpegs = digits if name == "digits" else photos
                difference, agreement = parity(cpu, other, jpegs)
                checks.append(
                    f"{name}: CPU vs CUDA (TF32 {'on' if tf32 else 'off'}) max |difference| "
                    f"{difference:.2e}, top-1 agreement {agreement:.2%} on {len(jpegs)} real "
                    "images"
                )
            del cpu, cuda
        for provider in providers:
            runtime_table += runtime_rows(name, model_dir, provider, photos, args.runtime_seconds)
            ceilings[name, provider] = ceiling(model_dir, provider, photos)
            if not args.skip_http:
                served.setdefault(name, {})[provider] = serve_and_load(
                    model_dir, provider, photos, args.seconds
                )

    print("\n".join(checks))
    print("\nONNX Runtime alone (photo JPEGs preprocessed once; mixed: 256 log-uniform sizes)")
    print(
        table(
            [
                "model",
                "provider",
                "sessions",
                "batch 1 img/s",
                "batch 64 img/s",
                "mixed img/s",
                "mixed p50 ms/call",
                "mixed p99 ms/call",
            ],
            runtime_table,
        )
    )
    print("\nCeiling: the default worker processes decoding photo JPEGs + inference, no HTTP")
    print(
        table(
            ["model", "provider", "workers", "decode threads each", "images/s"],
            [
                [
                    name,
                    provider,
                    default_workers(provider),
                    default_decode_threads(provider, default_workers(provider)),
                    value,
                ]
                for (name, provider), value in ceilings.items()
            ],
        )
    )
    if args.skip_http:
        return
    rows = []
    for name, by_provider in served.items():
        for provider, result in by_provider.items():
            versus_cpu = result["rps"] / by_provider["cpu"]["rps"] if provider != "cpu" else 1.0
            rows.append(
                [
                    name,
                    provider,
                    result["rps"],
                    result["p50"],
                    result["p99"],
                    f"{result['rps'] / ceilings[name, provider]:.2f}",
                    f"{versus_cpu:.2f}",
                    result["statuses"],
                ]
            )
    print(f"\nimgclf serve, default settings, 64 concurrent photo uploads, {args.seconds:g} s")
    print(
        table(
            [
                "model",
                "provider",
                "requests/s",
                "p50 ms",
                "p99 ms",
                "vs ceiling",
                "vs CPU",
                "status codes",
            ],
            rows,
        )
    )
    if has_cuda:
        print()
        print(table(["target", "measured", "verdict"], targets(served)))


if __name__ == "__main__":
    main()
