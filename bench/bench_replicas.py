"""`make bench`, part 5: one gateway, 1 vs 2 replicas of a family; and how soon a restarted
service is used again.

Throughput: --jobs small model-free jobs, source-noise (--edge² RGB) -> upscale-simple (x2,
lanczos: CPU-bound), sent with RunChain from a pool of --workers threads at once, through one
gateway whose TILECHAIN_UPSCALE_ADDR names one upscale replica, then two (two processes on
loopback; round_robin spreads the streams). Each configuration runs --repeats times,
alternating, after a warm-up; the table gives the medians of jobs/s and of each run's p50 and
p99 job time (RunChain sent -> final status, its queue wait included) and of queue wait
(JobStatus started_at - created_at: admission holds each replica to its stream limit,
TILECHAIN_UPSCALE_MAX_STREAMS, so a second replica admits twice as many jobs at once), and how
the streams split over the replicas.

Reconnect: stop the single upscale replica, keep it down --outage seconds while jobs are refused
(the gateway's channel backs off), start it again on the same port; from its health check saying
SERVING to the first job that succeeds through the gateway.

The stacks run from the slim environment (var/venv-slim, no torch) when `make setup` built it.
Records its section in bench/RESULTS.md between the bench-replicas:begin/end markers.

Run: python bench/bench_replicas.py [--jobs N] [--workers N] [--edge N] [--repeats N] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_chain import cpu_seconds, free_port, machine, results_block, publish  # noqa: E402

from tilechain.client import chain_request, connect  # noqa: E402
from tilechain.gateway.settings import DEFAULT_MAX_STREAMS  # noqa: E402
from tilechain.services.core.config import RECONNECT_MAX_MS, RECONNECT_WAIT_S  # noqa: E402
from tilechain.stack import Stack  # noqa: E402
from tilechain.v1 import gateway_pb2, stage_pb2, stage_pb2_grpc  # noqa: E402

BEGIN, END = "<!-- bench-replicas:begin -->", "<!-- bench-replicas:end -->"
SLIM_PYTHON = ROOT / "var" / "venv-slim" / "bin" / "python"
COMPONENTS = ("source", "upscale", "gateway")


def chain(edge: int) -> dict:
    return {"stages": [
        {"name": "noise", "type": "source-noise", "params": {"width": edge, "height": edge, "seed": 5}},
        {"name": "big", "type": "upscale-simple", "params": {"scale": 2, "method": "lanczos"}},
    ]}


def start(replicas: int, logs: Path, python: str) -> Stack:
    addresses = {c: f"127.0.0.1:{free_port()}" for c in ("source", "gateway", "blend", "correct", "persist", "reduce")}
    addresses["upscale"] = ",".join(f"127.0.0.1:{free_port()}" for _ in range(replicas))
    stack = Stack(addresses, logs, python=python)
    stack.start(COMPONENTS)
    return stack


def stats(stack: Stack, name: str) -> stage_pb2.ServiceStats:
    with grpc.insecure_channel(stack.process_addresses[name]) as channel:
        return stage_pb2_grpc.StageStub(channel).Stats(stage_pb2.StatsRequest(), timeout=30)


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def run_jobs(stack: Stack, request: gateway_pb2.ChainRequest, jobs: int, workers: int) -> dict:
    """jobs RunChains from workers threads; wall time and each job's time."""
    stub = connect(stack.addresses["gateway"])
    replicas = [n for n in stack.processes if n.startswith("upscale")]
    streams_before = {n: stats(stack, n).streams_started for n in replicas}
    cpu_before = {n: cpu_seconds(stack.processes[n].pid) for n in replicas}

    def one(_: int) -> tuple[float, float]:
        began = time.perf_counter()
        events = list(stub.RunChain(request, timeout=600))
        status = events[-1].status
        if status.state != gateway_pb2.JOB_STATE_SUCCEEDED:
            raise RuntimeError(f"job failed: {status}")
        waited = (status.started_at.ToNanoseconds() - status.created_at.ToNanoseconds()) / 1e9
        return time.perf_counter() - began, waited

    began = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, range(jobs)))
    wall = time.perf_counter() - began
    times = sorted(t for t, _ in results)
    waits = sorted(w for _, w in results)
    return {
        "wall": wall,
        "rate": jobs / wall,
        "p50": statistics.median(times),
        "p99": percentile(times, 0.99),
        "wait50": statistics.median(waits),
        "wait99": percentile(waits, 0.99),
        "streams": {n: stats(stack, n).streams_started - streams_before[n] for n in replicas},
        "cpu": {n: cpu_seconds(stack.processes[n].pid) - cpu_before[n] for n in replicas},
    }


def reconnect(stack: Stack, request: gateway_pb2.ChainRequest, outage: float) -> dict:
    """Stop upscale, refuse jobs for `outage` seconds, start it again: seconds from SERVING to
    the first job that succeeds."""
    stub = connect(stack.addresses["gateway"])
    stack.stop("upscale")
    refused = 0
    ends = time.monotonic() + outage
    while time.monotonic() < ends:
        try:
            list(stub.RunChain(request, timeout=30))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            refused += 1
    stack.restart("upscale")  # returns when its health check says SERVING
    serving = time.perf_counter()
    attempts = 0
    while True:
        attempts += 1
        try:
            list(stub.RunChain(request, timeout=30))
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
    return {"seconds": time.perf_counter() - serving, "attempts": attempts, "refused": refused}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--workers", type=int, default=8, help="RunChain calls in flight at once (default 8)")
    parser.add_argument("--edge", type=int, default=384, help="noise image edge in pixels (default 384)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration, alternating (default 3)")
    parser.add_argument("--outage", type=float, default=10.0, help="seconds the service stays down (default 10)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    info = machine()
    python = str(SLIM_PYTHON) if SLIM_PYTHON.exists() else sys.executable
    request = chain_request(chain(args.edge))
    load_start = os.getloadavg()[0]
    began = time.perf_counter()
    results: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="tilechain-bench-replicas-") as tmp:
        stacks = {n: start(n, Path(tmp) / f"logs-{n}", python) for n in (1, 2)}
        try:
            for n, stack in stacks.items():
                run_jobs(stack, request, min(20, args.jobs), args.workers)  # warm-up
            for repeat in range(args.repeats):
                for n, stack in stacks.items():
                    r = run_jobs(stack, request, args.jobs, args.workers)
                    results[n].append(r)
                    print(f"{n} replica(s), run {repeat + 1}: {r['rate']:.1f} jobs/s, p50 {r['p50']:.3f} s, "
                          f"p99 {r['p99']:.3f} s, streams {r['streams']}, cpu { {k: round(v, 1) for k, v in r['cpu'].items()} }", flush=True)
            back = reconnect(stacks[1], request, args.outage)
            print(f"reconnect: first job {back['seconds']:.2f} s after SERVING ({back['attempts']} attempt(s)); "
                  f"{back['refused']} jobs refused during the {args.outage:.0f} s outage", flush=True)
        finally:
            for stack in stacks.values():
                stack.stop()

    def med(n: int, key: str) -> float:
        return statistics.median(r[key] for r in results[n])

    lines = [
        f"Jobs: {args.jobs} per run, `source-noise({args.edge}x{args.edge}) -> upscale-simple(scale=2, method=lanczos)`, "
        f"model-free, sent with RunChain from {args.workers} threads at once through one gateway "
        f"(TILE_RETURN_NONE); medians of {args.repeats} runs per configuration, alternating, after a warm-up. "
        f"Job time = RunChain sent -> final status; queue wait = started_at - created_at (JobStatus); the upscale "
        f"stream limit per replica is the default ({DEFAULT_MAX_STREAMS['upscale']}), so 2 replicas admit twice the jobs at once. "
        f"Services from {'the slim environment' if python == str(SLIM_PYTHON) else sys.executable}.",
        "",
        "| upscale replicas | jobs/s | p50 job time | p99 job time | p50 queue wait | p99 queue wait | streams per replica (one run) | upscale CPU s per replica (one run) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n in (1, 2):
        last = results[n][-1]
        runs = ", ".join(f"{r['rate']:.1f}" for r in results[n])
        lines.append(
            f"| {n} | **{med(n, 'rate'):.1f}** (runs {runs}) | {med(n, 'p50'):.3f} s "
            f"| {med(n, 'p99'):.3f} s | {med(n, 'wait50'):.3f} s | {med(n, 'wait99'):.3f} s "
            f"| {' / '.join(str(v) for v in last['streams'].values())} "
            f"| {' / '.join(f'{v:.1f}' for v in last['cpu'].values())} |"
        )
    lines += [
        "",
        f"2 replicas / 1 replica: **{med(2, 'rate') / med(1, 'rate'):.2f}x** jobs/s. This machine has {info['cores']} cores for "
        "everything (the bench client, the gateway, source and the upscale replicas): a second replica can only "
        "use CPU the first leaves idle, so the gain here is bounded by the cores, not by the balancing; on "
        "separate nodes (or GPUs) each replica brings its own.",
        "",
        f"Reconnect: upscale stopped, {args.outage:.0f} s down ({back['refused']} jobs refused with UNAVAILABLE meanwhile, "
        f"each after the gateway's {RECONNECT_WAIT_S:.0f} s wait for a connection), started again on its port: the first job through the "
        f"gateway succeeded **{back['seconds']:.2f} s** after the service's health check said SERVING "
        f"({back['attempts']} attempt(s); reconnect backoff at most {RECONNECT_MAX_MS} ms; gRPC's default backoff grows to 120 s).",
        f"Bench wall time {time.perf_counter() - began:.0f} s; 1-minute load average {load_start:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end.",
    ]
    block = results_block(BEGIN, END, "bench_replicas.py", info, "no GPU", f"Python {info['python']}, {info['libs']}",
                          "`make bench` (`python bench/bench_replicas.py`)", lines, title="Replicas of a family behind one gateway")
    publish(BEGIN, END, block, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
