"""Jobs through the job store: throughput and queue wait of many small jobs on one and two
gateways, and what the store costs per job on each backend.

(a) 200 small model-free jobs (noise 64x64 -> crop 32x32 -> persist-disk PNG), submitted at once
    by 8 client threads, on: 1 gateway with the embedded SQLite store; 1 gateway on a
    valkey-server; 2 gateways on one valkey-server (submissions alternate between them).
    Reported: jobs/s (jobs / time from the first job queued to the last one ended) and the
    p50/p99 queue wait (started_at - created_at of each job, from its JobStatus). The family
    stream limits are raised to 16 so that the gateways, not admission, are what is measured.
(b) The store's own cost per job, in one process with no services: submit, claim, 8 events
    appended (stage started/finished x2, progress x3, an artifact), finish; timed per backend,
    one job after another.

Records its section in bench/RESULTS.md between the bench-jobs:begin/end markers.
Run: python bench/bench_jobs.py [--jobs N] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_chain import free_port, machine, results_block, publish  # noqa: E402

from tests.valkey import ValkeyServer  # noqa: E402
from tilechain.client import chain_request, connect  # noqa: E402
from tilechain.gateway.store import open_store  # noqa: E402
from tilechain.gateway.store.base import SUCCEEDED, NewJob, StoreConfig  # noqa: E402
from tilechain.stack import Stack  # noqa: E402
from tilechain.v1 import gateway_pb2, stage_pb2  # noqa: E402

BEGIN, END = "<!-- bench-jobs:begin -->", "<!-- bench-jobs:end -->"
SERVICES = ("source", "reduce", "persist")
CHAIN = {"stages": [
    {"name": "noise", "type": "source-noise", "params": {"width": 64, "height": 64, "seed": 1}},
    {"name": "cut", "type": "reduce-crop", "params": {"width": 32, "height": 32}},
    {"name": "save", "type": "persist-disk", "params": {"filename": "bench/{job}.png"}},
]}
LIMITS = {f"TILECHAIN_{f.upper()}_MAX_STREAMS": "16" for f in ("source", "reduce", "persist")}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def seconds(timestamp) -> float:
    return timestamp.ToNanoseconds() / 1e9


def run_jobs(services: Stack, store: str, gateways: int, jobs: int, log_dir: Path, env: dict[str, str]) -> dict:
    started = []
    stubs = []
    for n in range(gateways):
        stack = Stack(dict(services.addresses, gateway=f"127.0.0.1:{free_port()}"), log_dir / f"gw{n}")
        stack.start(("gateway",), extra_env={**env, **LIMITS, "TILECHAIN_JOB_STORE": store, "TILECHAIN_GATEWAY_ID": f"bench-{n}"})
        started.append(stack)
        stubs.append(connect(stack.addresses["gateway"]))
    try:
        request = chain_request(CHAIN)
        began = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda n: stubs[n % gateways].SubmitChain(request, timeout=120).job_id, range(jobs)))
            submitted = time.perf_counter() - began

            def ended(index: int) -> gateway_pb2.JobStatus:
                events = list(stubs[index % gateways].WatchJob(gateway_pb2.JobRef(job_id=ids[index]), timeout=600))
                return events[-1].status

            statuses = list(pool.map(ended, range(jobs)))
        wall = time.perf_counter() - began
    finally:
        for stack in started:
            stack.stop()
    assert all(s.state == SUCCEEDED for s in statuses), [s.message for s in statuses if s.state != SUCCEEDED][:3]
    waits = [seconds(s.started_at) - seconds(s.created_at) for s in statuses]
    span = max(seconds(s.ended_at) for s in statuses) - min(seconds(s.created_at) for s in statuses)
    return {
        "jobs_per_s": jobs / span, "span": span, "wall": wall, "submit_s": submitted,
        "p50": percentile(waits, 0.5), "p99": percentile(waits, 0.99), "mean": statistics.fmean(waits),
    }


async def store_overhead(url: str, jobs: int) -> float:
    """Seconds of store work per job: submit, claim, 8 events, finish."""
    store = open_store(url, StoreConfig(limits={"source": 1000, "reduce": 1000, "persist": 1000}))
    await store.open()
    request = chain_request(CHAIN).SerializeToString()
    started = gateway_pb2.StageEvent.KIND_STARTED
    finished = gateway_pb2.StageEvent.KIND_FINISHED
    events = [
        gateway_pb2.JobEvent(stage=gateway_pb2.StageEvent(kind=started, stage_index=0, name="noise")),
        gateway_pb2.JobEvent(stage=gateway_pb2.StageEvent(kind=started, stage_index=1, name="save")),
        *(gateway_pb2.JobEvent(progress=gateway_pb2.StageProgress(stage_index=0, name="noise", progress=stage_pb2.Progress(unit="tiles", done=d, total=3)))
          for d in (1, 2, 3)),
        gateway_pb2.JobEvent(stage=gateway_pb2.StageEvent(kind=finished, stage_index=0, name="noise")),
        gateway_pb2.JobEvent(artifact=stage_pb2.Artifact(stage="save", uri="file:///x.png")),
        gateway_pb2.JobEvent(stage=gateway_pb2.StageEvent(kind=finished, stage_index=1, name="save")),
    ]
    try:
        began = time.perf_counter()
        for n in range(jobs):
            job_id = f"bench{n}"
            await store.submit(NewJob(job_id, request, {"source": 1, "reduce": 1, "persist": 1}, 3, 3))
            claim = await store.claim("bench/1", wait=0)
            assert claim is not None and claim.id == job_id
            for event in events:
                await store.append(job_id, "bench/1", claim.run, event)
            await store.finish(job_id, "bench/1", claim.run, SUCCEEDED)
        return (time.perf_counter() - began) / jobs
    finally:
        await store.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200, help="jobs per configuration in (a) (default 200)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    info = machine()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        valkey = ValkeyServer(tmp / "valkey").start()
        output_root = tmp / "outputs"
        output_root.mkdir()
        env = {"TILECHAIN_OUTPUT_ROOT": str(output_root)}
        addresses = {f: f"127.0.0.1:{free_port()}" for f in (*SERVICES, "blend", "correct", "upscale")}
        services = Stack(addresses, tmp / "logs")
        services.start(SERVICES, extra_env=env)
        try:
            overhead = {
                "SQLite (WAL, synchronous=NORMAL)": asyncio.run(store_overhead(f"sqlite:///{tmp / 'overhead.db'}", 500)),
                "valkey-server (loopback)": asyncio.run(store_overhead(valkey.url, 500)),
            }
            for name, value in overhead.items():
                print(f"store overhead, {name}: {value * 1000:.2f} ms/job", flush=True)
            valkey.client().flushall()
            configs = {}
            for label, store, gateways in (
                ("1 gateway, SQLite", f"sqlite:///{tmp / 'jobs.db'}", 1),
                ("1 gateway, valkey", valkey.url, 1),
                ("2 gateways, valkey", valkey.url, 2),
            ):
                valkey.client().flushall()
                for old in (output_root / "bench").glob("*"):
                    old.unlink()
                result = run_jobs(services, store, gateways, args.jobs, tmp / label.replace(" ", "-").replace(",", ""), env)
                configs[label] = result
                print(f"{label}: {result['jobs_per_s']:.1f} jobs/s, queue wait p50 {result['p50']:.2f} s, "
                      f"p99 {result['p99']:.2f} s (submitting took {result['submit_s']:.1f} s)", flush=True)
        finally:
            services.stop()
            valkey.stop()
    lines = [
        f"(a) {args.jobs} small jobs (`source-noise 64x64 -> reduce-crop 32x32 -> persist-disk`), submitted at once by 8 client "
        "threads; one source, one reduce and one persist service; family limits raised to 16 streams, gateways run up "
        "to 16 jobs each (the defaults). jobs/s = jobs / (last ended_at − first created_at); queue wait = started_at − "
        "created_at of each job (JobStatus).",
        "",
        "| configuration | jobs/s | queue wait p50 | queue wait p99 | submitting all took |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {label} | **{r['jobs_per_s']:.1f}** | {r['p50']:.2f} s | {r['p99']:.2f} s | {r['submit_s']:.1f} s |" for label, r in configs.items()),
        "",
        "(b) The store's own work per job, no services, one job after another in one process: submit, claim, 8 "
        "events appended (2 stage started, 3 progress of one stage kept as one, 2 stage finished, 1 artifact), finish.",
        "",
        "| backend | per job |",
        "| --- | --- |",
        *(f"| {name} | **{value * 1000:.2f} ms** |" for name, value in overhead.items()),
        "",
        "On these 2 cores the services, the gateways, valkey and the client share the CPU, so a second gateway "
        "adds work to the same cores rather than capacity; on separate machines the gateways' share of a job is "
        "what a second replica divides. With SQLite the store's work runs inside the gateway's process (on one "
        "thread), with valkey in valkey's own process: where the SQLite gateway shows a queue wait it fell "
        "behind the submissions. "
        f"Load average (1 min) when the bench started: {load:.1f}"
        + (" — other work was running on this machine, so the numbers are noisy." if load > 1.5 else "."),
    ]
    block = results_block(BEGIN, END, "bench_jobs.py", info, "no GPU", f"Python {info['python']}, {info['libs']}",
                          f"`python bench/bench_jobs.py --jobs {args.jobs}`", lines, "Jobs: throughput, queue wait, store overhead")
    publish(BEGIN, END, block, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
