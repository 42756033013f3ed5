"""The cost of monitoring: service throughput with our metrics, drift and the feedback store
(every prediction kept for its delayed label) on versus off.

Same model, same requests (real JPEG uploads through wrk at one concurrency), alternating
rounds of the configurations in one run (every other round in reverse order) so machine
noise hits them all. Every setting is the default (drift every 15 s, the feedback store of
100,000 predictions), as a user would run it.

``--pin`` gives each server one worker on CPU 0 and wrk CPU 1 (``taskset``): on a small
machine, a server sharing its cores with the load generator measures the scheduler as much
as itself.

    .venv/bin/python benchmarks/bench_monitoring.py [--model model_repository/digits] [--pin]
"""

from __future__ import annotations

import argparse
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
    paired_interval,
    ratio_rows,
    side_by_side,
    side_by_side_header,
    wrk_script,
)
from benchmarks.common import table
from serving.core.roles import resolve_model_dir

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
    parser.add_argument(
        "--pin", action="store_true", help="One worker on CPU 0 per server, wrk on CPU 1."
    )
    args = parser.parse_args()
    pin = ["taskset", "-c", "0"] if args.pin else []
    model_dir = resolve_model_dir(args.model).resolve()
    with tempfile.TemporaryDirectory() as scratch:
        script = wrk_script(Path(scratch), digit_jpegs())
        servers = {}
        for mode, settings in MODES.items():
            port = free_port()
            env = {
                "IMGCLF_PROVIDER": "cpu",
                **({"IMGCLF_WORKERS": "1", "IMGCLF_INTRA_OP_THREADS": "1"} if args.pin else {}),
                **settings,
                # Its own runtime folder: `bentoml serve` empties it at start, and it holds the
                # metrics and the feedback store of the server running beside it.
                "BENTOML_HOME": tempfile.mkdtemp(dir=scratch),
            }
            servers[mode] = Process(
                [
                    *pin,
                    str(BIN / "imgclf"),
                    "serve",
                    *("--model", str(model_dir)),
                    "--port",
                    str(port),
                ],
                env,
                port,
            )
        cpu: dict[str, list[float]] = {}
        try:
            results = side_by_side(
                servers,
                script,
                args.concurrency,
                args.seconds,
                args.rounds,
                cpu,
                wrk_cpus="1" if args.pin else None,
            )
        finally:
            for server in servers.values():
                server.stop()
    print(side_by_side_header(model_dir, args))
    for figures, what, title in (
        (results, "requests/s (median)", ""),
        (cpu, "CPU ms/request (median)", "CPU time of each server's processes per request (ms)"),
    ):
        if title:
            print(f"\n{title}, in the same rounds:\n")
        interval = paired_interval(figures, "off")  # the last configuration: the baseline
        rows = [[*row, interval[row[0]]] for row in ratio_rows(figures, "off")]
        headers = ["monitoring", what, "rounds", "vs off", "vs off, paired", "90 % interval"]
        print(table(headers, rows))


if __name__ == "__main__":
    main()
