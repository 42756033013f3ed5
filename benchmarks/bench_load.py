"""Load: concurrency 64 for 60 s with real JPEG uploads, errors by status, p99, and the
server's resident memory before and after.

Runs the service twice: without load shedding, and with IMGCLF_MAX_CONCURRENCY set so that
requests beyond it are refused early (429/503) instead of queueing.

    .venv/bin/python benchmarks/bench_load.py [--model model_repository/digits] [--seconds 60]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil

from benchmarks.bench_service import (
    BIN,
    ROOT,
    Process,
    digit_jpegs,
    free_port,
    wrk_script,
)
from benchmarks.common import machine, table
from serving.core.roles import resolve_model_dir

STATUS_COUNTING = """
threads = {}
setup = function(thread) table.insert(threads, thread) end
init = function(args) statuses = {} end
response = function(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
done = function(summary, latency, requests)
  local totals = {}
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do
      totals[status] = (totals[status] or 0) + count
    end
  end
  for status, count in pairs(totals) do
    io.write(string.format("STATUS %d %d\\n", status, count))
  end
end
"""


def rss(process: Process) -> float:
    root = psutil.Process(process.process.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20


def load(server: Process, script: Path, connections: int, seconds: int) -> dict:
    out = subprocess.run(
        [
            "wrk",
            "-t",
            "2",
            "-c",
            str(connections),
            "-d",
            f"{seconds}s",
            "--timeout",
            "30s",
            "--latency",
            "-s",
            str(script),
            server.url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    statuses = {int(s): int(c) for s, c in re.findall(r"STATUS (\d+) (\d+)", out)}

    def latency(percent: str) -> float:
        value, unit = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)", out, re.M).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1000.0}[unit]

    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "statuses": statuses,
        "p50": latency("50"),
        "p99": latency("99"),
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "socket_errors": socket_errors.group(1) if socket_errors else "none",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "model_repository" / "digits")
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--max-concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=30, help="seconds of load before 'before'")
    parser.add_argument("--env", action="append", default=[], help="extra KEY=VALUE for servers")
    args = parser.parse_args()
    model_dir = resolve_model_dir(args.model).resolve()
    extra = dict(item.split("=", 1) for item in args.env)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        script = wrk_script(Path(scratch), digit_jpegs())
        script.write_text(script.read_text() + STATUS_COUNTING)
        for label, env in (
            ("no shedding", {}),
            (
                f"max_concurrency {args.max_concurrency}",
                {"IMGCLF_MAX_CONCURRENCY": str(args.max_concurrency)},
            ),
        ):
            port = free_port()
            server = Process(
                [str(BIN / "imgclf"), "serve", "--model", str(model_dir), "--port", str(port)],
                {"IMGCLF_PROVIDER": "cpu", **extra, **env},
                port,
            )
            try:
                load(server, script, args.connections, args.warmup)  # pools reach their size
                before = rss(server)
                result = load(server, script, args.connections, args.seconds)
                after = rss(server)
            finally:
                server.stop()
            statuses = result["statuses"]
            shed = sum(count for status, count in statuses.items() if status in (429, 503))
            other = sum(
                count for status, count in statuses.items() if status not in (200, 429, 503)
            )
            rows.append(
                [
                    label,
                    result["rps"],
                    statuses.get(200, 0),
                    shed,
                    other,
                    result["socket_errors"],
                    result["p50"],
                    result["p99"],
                    before,
                    after,
                    f"{(after / before - 1) * 100:+.1f}%",
                ]
            )
    print(f"machine: {machine()}")
    print(
        f"model: {model_dir}; {args.connections} connections, {args.seconds} s, real digit "
        "JPEG uploads\n"
    )
    print(
        table(
            [
                "server",
                "requests/s",
                "200",
                "shed (429/503)",
                "other errors",
                "socket errors",
                "p50 ms",
                "p99 ms",
                "RSS before MiB",
                "RSS after MiB",
                "RSS change",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
