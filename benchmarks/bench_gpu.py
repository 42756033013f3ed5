"""GPU check and benchmark: one command for a machine with an NVIDIA GPU (CUDA 13).

    pip install -c constraints.txt -e '.[gpu,dev]'
    python benchmarks/bench_gpu.py --digits model_repository/digits --mobilenet DIR

Checks and prints, for the digits model and a MobileNetV2 at 224x224 (export one with
``imgclf train --dataset digits --arch mobilenetv2 --weights none --image-size 224
--epochs 1 -o runs/mnv2 && imgclf export runs/mnv2 --name mobilenetv2``):

1. CUDA actually in use (the session's provider, read back, not asked for);
2. CPU vs CUDA parity on real digit images, with TF32 on (the default) and off: max
   |difference| and top-1 agreement;
3. images/s at batch 1, 8 and 64 on each provider, ONNX Runtime alone;
4. the in-process ceiling on each provider: decode on a thread pool + infer, one process;
5. ``imgclf serve`` (default settings) under 64 concurrent real JPEG uploads for 30 s on each
   provider: requests/s, p50/p99 and every status code, and the ratio to the ceiling.

Targets on a GPU: no 503 and no 5xx at concurrency 64, and at least 0.5x the in-process GPU
ceiling. Without a GPU (or without onnxruntime-gpu) the CPU half runs and the CUDA half is
skipped with a line that says so.
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
from benchmarks.common import machine, table  # noqa: E402
from serving.model_dir import resolve_model_dir  # noqa: E402
from serving.runtime import CUDA, ClassifierRuntime, CudaOptions  # noqa: E402

PROVIDERS = ("cpu", "cuda")
BATCHES = (1, 8, 64)


def cuda_available() -> tuple[bool, str]:
    """Whether a CUDA session can be made here, and why not."""
    if CUDA not in ort.get_available_providers():
        return False, "this onnxruntime has no CUDAExecutionProvider (install the gpu extra)"
    return True, ""


def runtime_for(
    model_dir: Path, provider: str, max_batch_size: int = 64, tf32: bool = True
) -> ClassifierRuntime:
    runtime = ClassifierRuntime(
        model_dir, provider=provider, max_batch_size=max_batch_size, cuda=CudaOptions(tf32=tf32)
    )
    runtime.warm_up((1, 8, 64))
    return runtime


def parity(cpu: ClassifierRuntime, cuda: ClassifierRuntime, jpegs: list[bytes]) -> tuple:
    images = np.stack([cpu.preprocess(data) for data in jpegs])
    expected, actual = cpu.predict(images), cuda.predict(images)
    agreement = float((expected.argmax(1) == actual.argmax(1)).mean())
    return float(np.abs(expected - actual).max()), agreement


def images_per_second(runtime: ClassifierRuntime, batch: int, seconds: float = 3.0) -> float:
    images = np.stack([np.zeros(runtime.spec.input_shape, np.float32)] * batch)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        runtime.predict(images)
        done += batch
    return done / (time.perf_counter() - started)


def ceiling(runtime: ClassifierRuntime, jpegs: list[bytes], seconds: float = 5.0) -> float:
    """Decode batches of 64 on a thread pool while the previous batch runs: images/s."""
    batch = [jpegs[i % len(jpegs)] for i in range(64)]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        done, started = 0, time.perf_counter()
        pending = pool.map(runtime.preprocess, batch)
        while time.perf_counter() - started < seconds:
            images = np.stack(list(pending))
            pending = pool.map(runtime.preprocess, batch)
            runtime.predict(images)
            done += len(images)
    return done / (time.perf_counter() - started)


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
                    "image", jpegs[index % len(jpegs)], filename="d.jpg", content_type="image/jpeg"
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--digits", type=Path, default=ROOT / "model_repository" / "digits")
    parser.add_argument("--mobilenet", type=Path, help="A MobileNetV2 224x224 model directory.")
    parser.add_argument("--seconds", type=float, default=30.0, help="HTTP load per provider.")
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

    jpegs = digit_jpegs(64, size=256)
    rows, serving_rows, checks = [], [], []
    for name, location in models.items():
        model_dir = resolve_model_dir(location).resolve()
        runtimes = {provider: runtime_for(model_dir, provider) for provider in providers}
        if has_cuda:
            in_use = runtimes["cuda"].provider
            checks.append(f"{name}: CUDA session runs on {in_use}")
            for tf32, cuda in (
                (True, runtimes["cuda"]),
                (False, runtime_for(model_dir, "cuda", tf32=False)),
            ):
                difference, agreement = parity(runtimes["cpu"], cuda, jpegs)
                checks.append(
                    f"{name}: CPU vs CUDA (TF32 {'on' if tf32 else 'off'}) max |difference| "
                    f"{difference:.2e}, top-1 agreement {agreement:.2%} on {len(jpegs)} real "
                    "digit JPEGs"
                )
        for provider, runtime in runtimes.items():
            speeds = [images_per_second(runtime, batch) for batch in BATCHES]
            best = ceiling(runtime, jpegs)
            rows.append([name, provider, *speeds, best])
            result = serve_and_load(model_dir, provider, jpegs, args.seconds)
            errors = sum(v for k, v in result["statuses"].items() if k != "200")
            serving_rows.append(
                [
                    name,
                    provider,
                    result["rps"],
                    result["p50"],
                    result["p99"],
                    f"{result['rps'] / best:.2f}",
                    result["statuses"],
                    "ok" if errors == 0 else f"{errors} not 200",
                ]
            )
    print("\n".join(checks))
    print()
    print(
        table(
            ["model", "provider", *[f"batch {b} img/s" for b in BATCHES], "ceiling img/s"],
            rows,
        )
    )
    print()
    print(
        table(
            [
                "model",
                "provider",
                "requests/s (c=64)",
                "p50 ms",
                "p99 ms",
                "vs ceiling",
                "status codes",
                "errors",
            ],
            serving_rows,
        )
    )


if __name__ == "__main__":
    main()
