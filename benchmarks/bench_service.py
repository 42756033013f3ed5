"""HTTP serving throughput: our service vs the in-process ceiling vs a TensorFlow reference.

In one run, on one model (default: the newest model_repository/digits version):
- the imgclf service (``imgclf serve``, default settings) at concurrency 1, 8 and 32, real
  JPEG uploads (multipart field ``image``), driven by wrk (C, so the load generator costs
  little CPU);
- the in-process ceiling: decode + preprocess + ONNX Runtime in one loop, no HTTP, at batch
  1 (the reference for the ratio) and batch 32;
- a reference service built the tutorial way: BentoML serving the SavedModel with TensorFlow,
  same request (``benchmarks/tf_reference_service.py``);
- phone photos (12-megapixel class JPEGs from real photos, ``common.phone_photos``) at
  concurrency 8, served twice from the same ONNX graph, side by side, three alternating rounds:
  with the preprocessing contract of models exported before the JPEG draft step (full-size
  decoding), or with ``--before-tree``'s code (a worktree of main), and with today's;
- with ``--before-tree``, digit uploads at concurrency 32 on both codes, side by side,
  ``--rounds`` alternating rounds (the median counts).

    .venv/bin/python benchmarks/bench_service.py [--model model_repository/digits] [--seconds 15]
    git worktree add /tmp/main main   # then: ... --before-tree /tmp/main

Needs wrk (``apt-get install wrk``).
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks.common import (  # noqa: E402
    Timer,
    contract_copy,
    machine,
    phone_photos,
    table,
)
from serving.core.roles import resolve_model_dir  # noqa: E402
from serving.core.runtime import ClassifierRuntime  # noqa: E402
from training.datasets import discover, write_digits  # noqa: E402

BOUNDARY = "imgclfbenchboundary"
BIN = Path(sys.executable).parent


def digit_jpegs(count: int = 16, size: int = 128) -> list[bytes]:
    """Real handwritten digits as the JPEG uploads a phone or scanner would send."""
    samples = discover(write_digits()).samples[:count]
    jpegs = []
    for sample in samples:
        with Image.open(sample.path) as image:
            buffer = io.BytesIO()
            resized = image.convert("RGB").resize((size, size), Image.BILINEAR)
            resized.save(buffer, "JPEG", quality=90)
            jpegs.append(buffer.getvalue())
    return jpegs


def multipart(jpeg: bytes) -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="d.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + jpeg
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def wrk_script(workdir: Path, jpegs: list[bytes]) -> Path:
    paths = []
    for index, jpeg in enumerate(jpegs):
        path = workdir / f"body{index}.bin"
        path.write_bytes(multipart(jpeg))
        paths.append(f'"{path}"')
    script = workdir / "post.lua"
    script.write_text(f"""
bodies = {{}}
for i, path in ipairs({{{", ".join(paths)}}}) do
  local f = io.open(path, "rb"); bodies[i] = f:read("*all"); f:close()
end
counter = 0
request = function()
  counter = counter + 1
  local headers = {{["Content-Type"] = "multipart/form-data; boundary={BOUNDARY}"}}
  return wrk.format("POST", "/predict", headers, bodies[(counter % #bodies) + 1])
end
""")
    return script


def run_wrk(
    url: str, script: Path, connections: int, seconds: int, cpus: str | None = None
) -> dict:
    """wrk's figures for one run; ``cpus`` pins it (``taskset -c``) away from the server."""
    out = subprocess.run(
        [
            *(["taskset", "-c", cpus] if cpus else []),
            "wrk",
            "-t",
            str(min(2, connections)),
            "-c",
            str(connections),
            "-d",
            f"{seconds}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def latency(percent: str) -> float:
        value, unit = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)", out, re.M).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1000.0}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50": latency("50"),
        "p99": latency("99"),
        "errors": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


def side_by_side(
    servers: dict[str, Process],
    script: Path,
    concurrency: int,
    seconds: int,
    rounds: int,
    cpu: dict[str, list[float]] | None = None,
    wrk_cpus: str | None = None,
) -> dict[str, list[float]]:
    """Requests/s of each server, one loaded at a time, in alternating rounds (every other
    round in reverse order, so that no configuration always runs first) after a warm-up.
    With ``cpu``, also the CPU milliseconds each server's processes spent per request in
    each round: on a shared machine whose speed drifts, work per request is steadier than
    requests per second. ``wrk_cpus`` pins the load generator (``run_wrk``)."""
    results: dict[str, list[float]] = {name: [] for name in servers}
    for server in servers.values():
        run_wrk(server.url, script, concurrency, 3, wrk_cpus)
    for round_index in range(rounds):
        order = list(servers.items())
        for name, server in order if round_index % 2 == 0 else order[::-1]:
            before = cpu_seconds(server.process.pid)
            result = run_wrk(server.url, script, concurrency, seconds, wrk_cpus)
            spent = cpu_seconds(server.process.pid) - before
            assert result["errors"] == 0, result
            results[name].append(result["rps"])
            if cpu is not None:
                cpu.setdefault(name, []).append(1000 * spent / (result["rps"] * seconds))
    return results


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process and all its descendants (the workers)."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def side_by_side_header(model: Path, args) -> str:
    """What a side-by-side table was measured on, printed above it."""
    return (
        f"machine: {machine()}\nmodel: {model}; concurrency {args.concurrency}; median of "
        f"{args.rounds} alternating {args.seconds} s rounds (all servers up, one loaded at a "
        "time)\n"
    )


def ratio_rows(results: dict[str, list[float]], baseline: str) -> list[list]:
    """Per configuration: its median, its rounds, its median against ``baseline``'s, and the
    median of its round-by-round ratios to ``baseline`` (each pair ran seconds apart, so
    the machine's slower drifts cancel)."""
    reference = statistics.median(results[baseline])

    def paired(rounds: list[float]) -> float:
        return statistics.median(a / b for a, b in zip(rounds, results[baseline], strict=True))

    return [
        [
            name,
            statistics.median(rounds),
            ", ".join(f"{r:.0f}" if r >= 100 else f"{r:.3g}" for r in rounds),
            f"{(statistics.median(rounds) / reference - 1) * 100:+.1f}%",
            f"{(paired(rounds) - 1) * 100:+.1f}%",
        ]
        for name, rounds in results.items()
    ]


def paired_interval(
    results: dict[str, list[float]],
    baseline: str,
    confidence: float = 0.9,
    replicates: int = 10_000,
    seed: int = 0,
) -> dict[str, str]:
    """Per configuration, the bootstrap interval (rounds resampled) of its median
    round-by-round ratio to ``baseline``: on a machine whose speed drifts, how far the paired
    figure can be trusted."""
    rng = np.random.default_rng(seed)
    intervals = {}
    for name, rounds in results.items():
        ratios = np.asarray(rounds) / np.asarray(results[baseline])
        medians = np.median(ratios[rng.integers(0, len(ratios), (replicates, len(ratios)))], 1)
        low, high = np.quantile(medians, [(1 - confidence) / 2, (1 + confidence) / 2])
        intervals[name] = f"{(low - 1) * 100:+.1f}% to {(high - 1) * 100:+.1f}%"
    return intervals


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Process:
    def __init__(self, args: list[str], env: dict, port: int, cwd: Path = ROOT) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(
            args,
            env={**os.environ, **env},
            cwd=cwd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{args[0]} did not become ready")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=60)


def serve(model_dir: Path, tree: Path = ROOT) -> Process:
    """``imgclf serve`` on the CPU provider, from this checkout or from another one (a git
    worktree of the commit to compare with: its code, this environment)."""
    port = free_port()
    command = [str(BIN / "imgclf")]
    env = {"IMGCLF_PROVIDER": "cpu"}
    if tree != ROOT:
        command = [str(BIN / "python"), "-c", "import sys; from imgclf.cli import run; run()"]
        env["PYTHONPATH"] = str(tree)
    return Process(
        [*command, "serve", "--model", str(model_dir), "--port", str(port)], env, port, cwd=tree
    )


def photo_comparison(
    model_dir: Path, scratch: Path, count: int, seconds: int, before_tree: Path | None
) -> list[list]:
    """Phone-photo uploads at concurrency 8, before and after the JPEG draft step. Before: the
    contract of models exported without the step, on this code, or ``before_tree``'s code (a
    worktree of main) serving the model as it is."""
    photos = phone_photos(count)
    (scratch / "photos").mkdir()
    script = wrk_script(scratch / "photos", photos)
    if before_tree is None:
        before = serve(contract_copy(model_dir, scratch / "before", None))
        before_label = "full-size decoding (before)"
    else:
        before = serve(model_dir, before_tree.resolve())
        before_label = f"{before_tree.name} (full-size decoding)"
    try:
        after = serve(contract_copy(model_dir, scratch / "after", 2.0))
    except RuntimeError:
        before.stop()
        raise
    labels = (before_label, "JPEG draft, margin 2")
    return alternated(before, after, labels, script, 8, seconds, rounds=3)


def code_comparison(
    model_dir: Path, script: Path, before_tree: Path, seconds: int, rounds: int
) -> list[list]:
    """Digit uploads at concurrency 32, ``before_tree``'s code (a worktree of main) against
    this checkout's, the same model."""
    before = serve(model_dir, before_tree.resolve())
    try:
        after = serve(model_dir)
    except RuntimeError:
        before.stop()
        raise
    labels = (f"{before_tree.name} (before)", "this checkout")
    return alternated(before, after, labels, script, 32, seconds, rounds)


def alternated(
    before: Process,
    after: Process,
    labels: tuple[str, str],
    script: Path,
    connections: int,
    seconds: int,
    rounds: int,
) -> list[list]:
    """Both servers up side by side, wrk alternating between them, ``rounds`` rounds each
    (then both are stopped); per server, its median round against ``before``'s."""
    results: dict[str, list[dict]] = {"before": [], "after": []}
    try:
        for server in (before, after):
            run_wrk(server.url, script, connections, 3)
        for _ in range(rounds):
            results["before"].append(run_wrk(before.url, script, connections, seconds))
            results["after"].append(run_wrk(after.url, script, connections, seconds))
    finally:
        before.stop()
        after.stop()
    rows = []
    base = float(np.median([r["rps"] for r in results["before"]]))
    for key, label in zip(("before", "after"), labels, strict=True):
        median = sorted(results[key], key=lambda r: r["rps"])[len(results[key]) // 2]
        errors = sum(r["errors"] for r in results[key])
        sockets = "; ".join(r["socket_errors"] for r in results[key] if r["socket_errors"]) or 0
        rows.append(
            [
                label,
                connections,
                median["rps"],
                median["p50"],
                median["p99"],
                " / ".join(f"{r['rps']:.1f}" for r in results[key]),
                f"{errors} / {sockets}",
                f"{median['rps'] / base:.2f}x",
            ]
        )
    return rows


def ceiling(model_dir: Path, jpegs: list[bytes], seconds: float, batch_size: int) -> float:
    """Decode + preprocess + ONNX Runtime in one process, no HTTP: images/s."""
    runtime = ClassifierRuntime(model_dir, provider="cpu", max_batch_size=max(batch_size, 2))
    runtime.warm_up()
    done = 0
    with Timer() as timer:
        while time.perf_counter() - timer.start < seconds:
            arrays = [runtime.preprocess(jpegs[(done + i) % len(jpegs)]) for i in range(batch_size)]
            runtime.predict(np.stack(arrays))
            done += batch_size
    return done / timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "model_repository" / "digits")
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument("--photos", type=int, default=8, help="phone photos; 0: skip them")
    parser.add_argument(
        "--before-tree",
        type=Path,
        help="a checkout (git worktree) whose code serves the 'before' rounds: digit "
        "uploads at concurrency 32, and the phone photos",
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="alternating rounds against --before-tree"
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("error: wrk is not installed (apt-get install wrk)")

    model_dir = resolve_model_dir(args.model).resolve()
    jpegs = digit_jpegs()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        script = wrk_script(Path(scratch), jpegs)
        ceiling_1 = ceiling(model_dir, jpegs, 5, 1)
        ceiling_32 = ceiling(model_dir, jpegs, 5, 32)
        rows.append(["in-process ceiling, batch 1", "-", ceiling_1, "", "", "", ""])
        rows.append(["in-process ceiling, batch 32", "-", ceiling_32, "", "", "", ""])

        ours = serve(model_dir)
        results = {}
        try:
            for connections in args.concurrency:
                run_wrk(ours.url, script, connections, 3)  # warm the connections
                results[connections] = run_wrk(ours.url, script, connections, args.seconds)
        finally:
            ours.stop()

        reference = {}
        if not args.skip_reference:
            port = free_port()
            ref = Process(
                [
                    str(BIN / "bentoml"),
                    "serve",
                    "benchmarks.tf_reference_service:TFReference",
                    "--port",
                    str(port),
                ],
                {"REFERENCE_MODEL_DIR": str(model_dir), "TF_CPP_MIN_LOG_LEVEL": "3"},
                port,
            )
            try:
                for connections in args.concurrency:
                    run_wrk(ref.url, script, connections, 3)
                    reference[connections] = run_wrk(ref.url, script, connections, args.seconds)
            finally:
                ref.stop()
        code_rows = (
            code_comparison(model_dir, script, args.before_tree, args.seconds, args.rounds)
            if args.before_tree
            else []
        )
        photo_rows = (
            photo_comparison(model_dir, Path(scratch), args.photos, args.seconds, args.before_tree)
            if args.photos
            else []
        )

    # The machine is shared: measure the ceiling again after the servers and rate against the
    # higher of the two (the conservative ratio).
    ceiling_1 = max(ceiling_1, ceiling(model_dir, jpegs, 5, 1))
    rows[0][2] = ceiling_1
    for connections in args.concurrency:
        mine = results[connections]
        versus_tf = (
            f"{mine['rps'] / reference[connections]['rps']:.1f}x"
            if connections in reference
            else ""
        )
        rows.append(
            [
                "imgclf service (ONNX Runtime)",
                connections,
                mine["rps"],
                mine["p50"],
                mine["p99"],
                f"{mine['rps'] / ceiling_1:.2f}",
                versus_tf,
            ]
        )
        if connections in reference:
            ref_row = reference[connections]
            rows.append(
                [
                    "reference: BentoML + TF SavedModel",
                    connections,
                    ref_row["rps"],
                    ref_row["p50"],
                    ref_row["p99"],
                    f"{ref_row['rps'] / ceiling_1:.2f}",
                    "",
                ]
            )
    errors = {c: (r["errors"], r["socket_errors"]) for c, r in results.items()}
    print(f"machine: {machine()}")
    print(
        f"model: {model_dir} ; {len(jpegs)} real digit JPEGs (128x128) as multipart uploads; "
        f"wrk {args.seconds} s per point; non-2xx/socket errors (ours): {errors}\n"
    )
    print(
        table(
            [
                "server",
                "concurrency",
                "requests/s",
                "p50 ms",
                "p99 ms",
                "vs ceiling (batch 1)",
                "vs TF reference",
            ],
            rows,
        )
    )
    headers = ["server", "concurrency", "requests/s (median)", "p50 ms", "p99 ms"]
    headers += ["each round", "non-2xx / socket errors", "vs before"]
    if code_rows:
        print(
            f"\n{len(jpegs)} digit JPEGs, {args.rounds} alternating rounds, the code of "
            f"{args.before_tree} and of this checkout (both up side by side):\n"
        )
        print(table(headers, code_rows))
    if photo_rows:
        print(
            f"\n{args.photos} phone photos (12-megapixel class JPEGs from real photos) as "
            f"multipart uploads, the same model:\n"
        )
        print(table(["decoding", *headers[1:]], photo_rows))


if __name__ == "__main__":
    main()
