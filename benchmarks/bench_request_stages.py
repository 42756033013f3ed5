"""Where a loaded server's CPU goes, per request and per stage of the request path.

One ``imgclf serve`` (default workers: 2 here; the CPU provider) takes digit JPEG uploads
from wrk at concurrency 32 (``bench_service``'s requests), for two windows of ``--seconds``:

1. **Per-thread CPU counters**, no profiler attached: every thread's user and system time
   from ``/proc/<pid>/task/<tid>/stat`` before and after, per request answered. In a worker
   the main thread is the event loop (uvicorn, Starlette, BentoML's middleware and ours,
   every ``await``); the others are ONNX Runtime's, the batcher's, the decode pool's and
   monitoring's.
2. **The same counters with a sampling profiler** (py-spy on every worker, ``--rate``
   samples a second, by thread): each thread's CPU is split by its own samples, each sample
   going to the stage of its innermost frame that a stage names (``STAGES``, in order;
   helper modules such as ``re`` or ``typing`` count for their caller). py-spy samples
   waiting threads here too (its idle detection misses them), so samples that wait are
   dropped: those whose innermost frame waits (``WAITING``), and, for an event loop, whose
   innermost Python frame is uvloop's ``run_until_complete`` (the loop in C: waiting in
   ``epoll`` or working, unseen), as many as the thread's idle share of the window (its CPU
   counter says how much it worked); the rest of those are the loop's own C work. Native
   threads that py-spy cannot see (ONNX Runtime's pool) are their own stage.

py-spy is in the ``dev`` extras; it needs to trace the workers (root, or ptrace allowed).
Monitoring's CPU per image is the monitoring stages' share (``MONITORING``): its own threads
and its work on the event loop alike (one image a request).

    .venv/bin/python benchmarks/bench_request_stages.py [--model DIR] [--seconds 20]
    git worktree add /tmp/main main   # then: ... --before-tree /tmp/main (both, one run)
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from benchmarks.bench_service import (  # noqa: E402
    BIN,
    digit_jpegs,
    run_wrk,
    serve,
    wrk_script,
)
from benchmarks.common import machine, table  # noqa: E402
from serving.core.roles import resolve_model_dir  # noqa: E402

#: Stages of the request path, by the files their frames are in (prefixes of py-spy's short
#: file names), in the order they are tried on each frame. Feedback before monitoring: the
#: feedback store lives in ``monitoring/``.
STAGES: dict[str, tuple[str, ...]] = {
    "inference (ONNX Runtime)": ("onnxruntime/",),
    "decode and preprocessing": ("PIL/", "serving/core/preprocessing"),
    "feedback ids and store": ("serving/web/feedback", "monitoring/feedback"),
    "monitoring (ours)": ("monitoring/",),
    "metrics (prometheus_client)": ("prometheus_client/",),
    "tracing (OpenTelemetry)": ("opentelemetry/", "asgi/"),
    "logging": ("logging/",),
    "multipart and body": (
        "multipart/",
        "python_multipart/",
        "starlette/formparsers",
        "tempfile",
        "serving/web/multipart",
    ),
    "response encoding": ("json/", "starlette/responses", "serving/web/responses"),
    "HTTP protocol (uvicorn, httptools, ours)": (
        "uvicorn/",
        "httptools/",
        "h11/",
        "serving/web/http_limits",
    ),
    "ASGI layers (Starlette, anyio, our hot path)": (
        "starlette/",
        "anyio/",
        "serving/web/hot_path",
    ),
    "BentoML": ("bentoml/", "_bentoml_impl/", "_bentoml_sdk/"),
    "batcher (ours)": ("serving/web/batcher",),
    "shadow copies (ours)": ("serving/web/shadow",),
    "request handling (ours)": ("serving/",),
    "event loop (asyncio)": ("asyncio/", "selectors", "uvloop/"),
    "threads and futures": ("concurrent/", "threading"),
}
#: The stages that are monitoring's cost.
MONITORING = ("monitoring (ours)", "metrics (prometheus_client)", "feedback ids and store")
#: Helper modules that count for their caller.
TRANSPARENT = (
    "re/",
    "re.py",
    "typing",
    "enum",
    "functools",
    "abc",
    "contextlib",
    "dataclasses",
    "copy",
    "collections/",
    "weakref",
    "_weakrefset",
    "inspect",
    "types",
    "email/",
    "urllib/",
    "http/",
    "string",
    "codecs",
    "encodings/",
    "operator",
    "uuid",
    "random",
    "warnings",
    "numpy/",
    "<__array_function__",
    "<attrs generated",
    "<string>",
    "<frozen",
)
#: The innermost Python frame of a main thread in uvloop's C code: the loop itself, its
#: sockets, httptools' parsing and every callback that has no Python frame of its own.
IN_UVLOOP = "event loop in C (uvloop, httptools)"
#: Innermost frames of a thread that waits (for work, a timer or a lock).
WAITING = re.compile(
    r"^(_worker \(concurrent/futures/thread\.py|\w*\.?wait \(threading|"
    r"Queue\.get \(queue|select \(selectors|_wait_for_tstate_lock|sleep )"
)
#: Worker threads by name (py-spy's), and monitoring's, by the stage their work is.
THREAD_NAMES: dict[int, str] = {}
MONITORING_THREADS = {name: "monitoring (ours)" for name in ("drift", "metrics", "feedback")}
#: Threads with CPU but no Python stack: ONNX Runtime's intra-op pool.
NATIVE = "native threads (ONNX Runtime's pool)"
FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^:()]+)(?::\d+)?\)$")


def thread_cpu(root_pid: int) -> dict[tuple[int, int], float]:
    """CPU seconds of every thread of the server's processes, by (pid, tid)."""
    ticks = os.sysconf("SC_CLK_TCK")
    found = {}
    root = psutil.Process(root_pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            tids = os.listdir(f"/proc/{process.pid}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                stat = Path(f"/proc/{process.pid}/task/{tid}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            found[(process.pid, int(tid))] = (int(fields[11]) + int(fields[12])) / ticks
    return found


def worker_pids(root_pid: int) -> list[int]:
    """The processes that serve: those whose command line runs the service's workers."""
    root = psutil.Process(root_pid)
    return [
        p.pid
        for p in root.children(recursive=True)
        if "_bentoml_impl.worker" in " ".join(p.cmdline()) or "serve_http" in " ".join(p.cmdline())
    ]


def stage_of(stack: list[str]) -> str:
    """The stage of a sampled stack (root first): its innermost frame that names one."""
    if stack and stack[-1].startswith(("Runner.run (asyncio/runners", "run (asyncio/runners")):
        return IN_UVLOOP
    for frame in reversed(stack):
        match = FRAME.match(frame)
        if match is None:
            continue
        name = match["file"]
        if name.startswith(TRANSPARENT):
            continue
        for stage, prefixes in STAGES.items():
            if any(name.startswith(p) or f"/{p}" in name for p in prefixes):
                return stage
        return "other: " + name.split("/")[0]
    return "other"


def start_profilers(pids: list[int], seconds: int, rate: int, workdir: Path) -> list:
    """One py-spy recording each of ``pids`` for ``seconds``, started: (process, output)."""
    spy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy is not installed (it is in the dev extras): make venv")
    recorders = []
    for pid in pids:
        output = workdir / f"{pid}.txt"
        command = [spy, "record", "--pid", str(pid), "--rate", str(rate), "--threads"]
        command += ["--duration", str(seconds), "--format", "raw", "--output", str(output)]
        spy_process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        recorders.append((spy_process, output))
    return recorders


def read_profiles(recorders: list) -> dict[int, collections.Counter]:
    """Samples per stage of each thread (by its OS thread id), once every recording ends;
    ``WAITING`` samples under ``None``."""
    samples: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for recorder, output in recorders:
        _, errors = recorder.communicate()
        if recorder.returncode != 0 or not output.exists():
            raise SystemExit(f"py-spy failed: {errors.decode()[-500:]}")
        for line in output.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            thread, *frames = stack.split(";")
            found = re.match(r"thread \((\d+)\)(?::\s*(.*))?", thread)
            tid = int(found.group(1))
            THREAD_NAMES[tid] = found.group(2) or ""
            waiting = bool(frames) and WAITING.match(frames[-1]) is not None
            samples[tid][None if waiting else stage_of(frames)] += int(count)
    return samples


def split_by_stage(
    spent: dict[tuple[int, int], float],
    samples: dict[int, collections.Counter],
    workers: list[int],
    seconds: float,
) -> collections.Counter:
    """CPU seconds per stage: each worker thread's CPU shared out by its working samples."""
    stages: collections.Counter = collections.Counter()
    for (pid, tid), cpu in spent.items():
        if pid not in workers:
            continue
        counted = collections.Counter(samples.get(tid, {}))
        everything = sum(counted.values())
        counted.pop(None, None)
        if IN_UVLOOP in counted:  # the loop's idle share of the window was spent in epoll
            idle = everything * max(0.0, 1.0 - cpu / seconds)
            counted[IN_UVLOOP] = max(0.0, counted[IN_UVLOOP] - idle)
        working = sum(counted.values())
        if not working:  # no Python stack (native), or its work fell between samples
            name = THREAD_NAMES.get(tid, "")
            stages[NATIVE if not everything else MONITORING_THREADS.get(name, name)] += cpu
            continue
        for stage, count in counted.items():
            stages[stage] += cpu * count / working
    return stages


def measure(model_dir: Path, tree: Path, script: Path, args, workdir: Path) -> dict:
    """One server of ``tree``'s code, loaded for two windows: its CPU per request by thread
    (unprofiled) and by stage (profiled shares of the unprofiled total)."""
    server = serve(model_dir, tree)
    try:
        run_wrk(server.url, script, args.concurrency, 3)  # warm-up
        workers = worker_pids(server.process.pid)
        before = thread_cpu(server.process.pid)
        counted = run_wrk(server.url, script, args.concurrency, args.seconds)
        after = thread_cpu(server.process.pid)
        (workdir / tree.name).mkdir(exist_ok=True)
        recorders = start_profilers(workers, args.seconds, args.rate, workdir / tree.name)
        profiled_before = thread_cpu(server.process.pid)
        profiled = run_wrk(server.url, script, args.concurrency, args.seconds)
        profiled_after = thread_cpu(server.process.pid)
        samples = read_profiles(recorders)
    finally:
        server.stop()

    def difference(later: dict, earlier: dict) -> dict:
        return {key: later[key] - earlier.get(key, 0.0) for key in later}

    spent = difference(after, before)
    requests = counted["rps"] * args.seconds
    loop = sum(v for (pid, tid), v in spent.items() if pid in workers and pid == tid)
    other = sum(v for (pid, tid), v in spent.items() if pid in workers and pid != tid)
    rest = sum(v for (pid, _), v in spent.items() if pid not in workers)
    stages = split_by_stage(
        difference(profiled_after, profiled_before), samples, workers, args.seconds
    )
    # The profiler slows the workers down (it stops them to sample): the stages' shares come
    # from the profiled window, their CPU per request from the unprofiled counters.
    total = sum(stages.values())
    per_request = 1e6 * (loop + other) / requests
    return {
        "workers": len(workers),
        "counted": counted,
        "profiled": profiled,
        "threads": {
            "workers' event loops (main threads)": 1e6 * loop / requests,
            "workers' other threads": 1e6 * other / requests,
            "the server's other processes": 1e6 * rest / requests,
            "all": 1e6 * (loop + other + rest) / requests,
        },
        "shares": {stage: seconds / total for stage, seconds in stages.items()},
        "stages": {stage: per_request * seconds / total for stage, seconds in stages.items()},
        "monitoring": per_request * sum(stages[stage] for stage in MONITORING) / total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "model_repository" / "digits")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--keep", action="store_true", help="keep py-spy's raw stacks")
    parser.add_argument(
        "--before-tree",
        type=Path,
        help="a checkout (git worktree) to account for first, beside this one's account",
    )
    args = parser.parse_args()
    model_dir = resolve_model_dir(args.model).resolve()
    workdir = Path(tempfile.mkdtemp(prefix="imgclf-stages-"))
    script = wrk_script(workdir, digit_jpegs())
    trees = {"this checkout": ROOT}
    if args.before_tree is not None:
        trees = {f"{args.before_tree.name} (before)": args.before_tree.resolve(), **trees}
    accounts = {
        name: measure(model_dir, tree, script, args, workdir) for name, tree in trees.items()
    }

    names = list(accounts)
    print(f"{machine()}; {model_dir}; wrk c={args.concurrency}, {args.seconds} s a window")
    for name, account in accounts.items():
        counted, profiled = account["counted"], account["profiled"]
        print(
            f"{name}: {account['workers']} workers; {counted['rps']:,.0f} requests/s counted "
            f"({counted['errors']} non-2xx), {profiled['rps']:,.0f} requests/s profiled"
        )
    ratio = ["after / before"] if len(names) == 2 else []

    def row(label: str, values: list[float]) -> list:
        if not ratio:
            return [label, *values]
        return [label, *values, f"{values[1] / values[0]:.2f}" if values[0] else ""]

    first = accounts[names[-1]]
    print(
        table(
            ["threads (no profiler), CPU µs per request", *names, *ratio],
            [
                row(label, [a["threads"][label] for a in accounts.values()])
                for label in first["threads"]
            ],
        )
    )
    stages = sorted(
        {
            stage
            for a in accounts.values()
            for stage, share in a["shares"].items()
            if share >= 0.001
        },
        key=lambda stage: -max(a["stages"].get(stage, 0.0) for a in accounts.values()),
    )
    print(
        table(
            ["stage (workers), CPU µs per request", *names, *ratio],
            [
                row(stage, [a["stages"].get(stage, 0.0) for a in accounts.values()])
                for stage in stages
            ],
        )
    )
    print(
        table(
            ["monitoring, CPU µs per image", *names, *ratio],
            [
                row(
                    "monitoring (ours, prometheus_client, feedback)",
                    [a["monitoring"] for a in accounts.values()],
                )
            ],
        )
    )
    if args.keep:
        print(f"py-spy's stacks: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
