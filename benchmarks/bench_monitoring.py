"""The cost of monitoring: service throughput with our metrics and drift on versus off.

Same model, same requests (real JPEG uploads through wrk at one concurrency), alternating
rounds of the two configurations in one run so machine noise hits both.

    .venv/bin/python benchmarks/bench_monitoring.py [--model model_repository/digits]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_service import (
    BIN,
    ROOT,
    Process,
    digit_jpegs,
    free_port,
    run_wrk,
    wrk_script,
)
from benchmarks.common import machine, table
from serving.model_dir import resolve_model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "model_repository" / "digits")
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    model_dir = resolve_model_dir(args.model).resolve()
    results: dict[str, list[float]] = {"on": [], "off": []}
    with tempfile.TemporaryDirectory() as scratch:
        script = wrk_script(Path(scratch), digit_jpegs())
        servers = {}
        for mode in ("on", "off"):
            port = free_port()
            env = {
                "IMGCLF_PROVIDER": "cpu",
                "IMGCLF_MONITORING": "true" if mode == "on" else "false",
                "IMGCLF_DRIFT_INTERVAL_S": "5",
            }
            servers[mode] = Process(
                [str(BIN / "imgclf"), "serve", "--model", str(model_dir), "--port", str(port)],
                env,
                port,
            )
        try:
            for server in servers.values():  # warm both
                run_wrk(server.url, script, args.concurrency, 3)
            for _ in range(args.rounds):
                for mode, server in servers.items():
                    result = run_wrk(server.url, script, args.concurrency, args.seconds)
                    assert result["errors"] == 0, result
                    results[mode].append(result["rps"])
        finally:
            for server in servers.values():
                server.stop()
    on, off = statistics.median(results["on"]), statistics.median(results["off"])
    print(f"machine: {machine()}")
    print(
        f"model: {model_dir}; concurrency {args.concurrency}; median of {args.rounds} "
        f"alternating {args.seconds} s rounds (both servers up, only one loaded at a time)\n"
    )
    print(
        table(
            ["monitoring", "requests/s (median)", "rounds", "vs off"],
            [
                [
                    "on (metrics + drift)",
                    on,
                    ", ".join(f"{r:.0f}" for r in results["on"]),
                    f"{(on / off - 1) * 100:+.1f}%",
                ],
                ["off", off, ", ".join(f"{r:.0f}" for r in results["off"]), "0.0%"],
            ],
        )
    )


if __name__ == "__main__":
    main()
