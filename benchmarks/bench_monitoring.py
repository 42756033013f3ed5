"""The cost of monitoring: service throughput with our metrics, drift and the feedback store
(every prediction kept for its delayed label) on versus off.

Same model, same requests (real JPEG uploads through wrk at one concurrency), alternating
rounds of the configurations in one run (every other round in reverse order) so machine
noise hits them all.

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
from serving.core.model_dir import resolve_model_dir

MODES = {
    "on (metrics, drift, feedback store)": {"IMGCLF_MONITORING": "true"},
    "on, no feedback store": {"IMGCLF_MONITORING": "true", "IMGCLF_FEEDBACK_STORE_SIZE": "0"},
    # The same configuration twice: how far two identical servers differ on this machine.
    "off, a second identical server (noise floor)": {"IMGCLF_MONITORING": "false"},
    "off": {"IMGCLF_MONITORING": "false"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "model_repository" / "digits")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    model_dir = resolve_model_dir(args.model).resolve()
    results: dict[str, list[float]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as scratch:
        script = wrk_script(Path(scratch), digit_jpegs())
        servers = {}
        for mode, settings in MODES.items():
            port = free_port()
            env = {
                "IMGCLF_PROVIDER": "cpu",
                "IMGCLF_DRIFT_INTERVAL_S": "5",
                **settings,
                # Its own runtime folder: `bentoml serve` empties it at start, and it holds the
                # metrics and the feedback store of the server running beside it.
                "BENTOML_HOME": tempfile.mkdtemp(dir=scratch),
            }
            servers[mode] = Process(
                [str(BIN / "imgclf"), "serve", "--model", str(model_dir), "--port", str(port)],
                env,
                port,
            )
        try:
            for server in servers.values():  # warm them all
                run_wrk(server.url, script, args.concurrency, 3)
            for round_index in range(args.rounds):
                # Every other round in reverse, so that no configuration always runs first.
                order = list(servers.items())
                for mode, server in order if round_index % 2 == 0 else order[::-1]:
                    result = run_wrk(server.url, script, args.concurrency, args.seconds)
                    assert result["errors"] == 0, result
                    results[mode].append(result["rps"])
        finally:
            for server in servers.values():
                server.stop()
    off = statistics.median(results["off"])  # the last configuration: the baseline
    print(f"machine: {machine()}")
    print(
        f"model: {model_dir}; concurrency {args.concurrency}; median of {args.rounds} "
        f"alternating {args.seconds} s rounds (all servers up, one loaded at a time)\n"
    )
    rows = []
    for mode, rounds in results.items():
        median = statistics.median(rounds)
        rows.append(
            [
                mode,
                median,
                ", ".join(f"{r:.0f}" for r in rounds),
                f"{(median / off - 1) * 100:+.1f}%",
            ]
        )
    print(table(["monitoring", "requests/s (median)", "rounds", "vs off"], rows))


if __name__ == "__main__":
    main()
