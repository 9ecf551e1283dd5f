"""`make bench`: memory and speed of a big chain, per process, against the image size.

Chain: source-noise (uniform, EDGE²) -> upscale-simple (x2, lanczos) -> reduce-thumbnail
(1024², lanczos) -> persist-disk (png), through the gateway, on a fresh stack per size (so that
each process's baseline is its idle RSS after start-up). For each process: RSS after start-up
(idle) and the peak (VmHWM) during the job; the peak above the idle RSS is what the job cost.
Also the engine's own peaks (ServiceStats.peak_input_bytes / peak_output_bytes), the job's wall
time, and the reduce-thumbnail stage alone in-process (8192² -> 1024², tiles fed from memory).

Run: python bench/bench_memory.py [--edges 2048,8192] [--no-write]
"""

from __future__ import annotations

import os

# numpy's BLAS single-threaded, as the services run it (tilechain/cli.py); before numpy loads
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_chain import free_port, machine, med, mib, process_memory, results_block, publish  # noqa: E402

from tilechain.client import chain_request, connect  # noqa: E402
from tilechain.services.core.codecs import tile_message  # noqa: E402
from tilechain.services.core.config import Settings  # noqa: E402
from tilechain.services.core.engine import TileEngine, plan_outputs  # noqa: E402
from tilechain.services.core.stage import Context, load_all  # noqa: E402
from tilechain.services.core.tiles import transport_grid  # noqa: E402
from tilechain.stack import Stack  # noqa: E402
from tilechain.v1 import gateway_pb2, stage_pb2, stage_pb2_grpc, tiles_pb2  # noqa: E402

BEGIN, END = "<!-- bench-memory:begin -->", "<!-- bench-memory:end -->"
COMPONENTS = ("source", "upscale", "reduce", "persist", "gateway")
SERVICES = ("source", "upscale", "reduce", "persist")
ALL_FAMILIES = ("source", "blend", "correct", "upscale", "persist", "reduce")


def chain(edge: int) -> dict:
    return {"stages": [
        {"name": "noise", "type": "source-noise", "params": {"width": edge, "height": edge, "seed": 1}},
        {"name": "x2", "type": "upscale-simple", "params": {"scale": 2, "method": "lanczos"}},
        {"name": "thumb", "type": "reduce-thumbnail", "params": {"width": 1024, "height": 1024, "method": "lanczos"}},
        {"name": "save", "type": "persist-disk", "params": {"filename": "{job}.{ext}", "format": "png"}},
    ]}


def run_size(edge: int, tmp: Path) -> dict:
    stack = Stack({c: f"127.0.0.1:{free_port()}" for c in COMPONENTS}, tmp / f"logs-{edge}")
    env = {"TILECHAIN_OUTPUT_ROOT": str(tmp / "outputs"), "TILECHAIN_MAX_PIXELS": str((2 * edge) ** 2)}
    stack.start(components=COMPONENTS, extra_env=env)
    try:
        pids = {c: stack.processes[c].pid for c in COMPONENTS}
        idle = {c: process_memory(p)["VmRSS"] for c, p in pids.items()}
        stubs = {c: stage_pb2_grpc.StageStub(grpc.insecure_channel(stack.addresses[c])) for c in SERVICES}
        t0 = time.perf_counter()
        status = None
        for event in connect(stack.addresses["gateway"]).RunChain(chain_request(chain(edge)), timeout=1800):
            if event.WhichOneof("kind") == "status":
                status = event.status
        wall = time.perf_counter() - t0
        if status is None or status.state != gateway_pb2.JOB_STATE_SUCCEEDED:
            raise RuntimeError(f"{edge}: the job failed: {status}")
        stats = {c: stubs[c].Stats(stage_pb2.StatsRequest(wait_idle=True), timeout=60) for c in SERVICES}
        peak = {c: process_memory(p)["VmHWM"] for c, p in pids.items()}
        return {
            "edge": edge, "wall": wall, "idle": idle, "peak": peak,
            "rise": {c: peak[c] - idle[c] for c in COMPONENTS},
            "engine": {c: (stats[c].peak_input_bytes, stats[c].peak_output_bytes) for c in SERVICES},
            "artifact": status.artifacts[0].size_bytes if status.artifacts else 0,
        }
    finally:
        stack.stop()


def idle_rss(launcher: list[str], tmp: Path) -> dict[str, int]:
    """RSS (KiB) of each service and the gateway, started alone, once its health check says
    SERVING, before any request. launcher: the command that runs `tilechain ...`."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    out = {}
    for component in (*ALL_FAMILIES, "gateway"):
        address = f"127.0.0.1:{free_port()}"
        args = ["gateway", "--address", address] if component == "gateway" else ["serve", component, "--address", address]
        env = {**os.environ, "TILECHAIN_OUTPUT_ROOT": str(tmp / "outputs")}
        env.pop("TILECHAIN_PRELOAD", None)
        process = subprocess.Popen([*launcher, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with grpc.insecure_channel(address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                while stub.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=120).status != health_pb2.HealthCheckResponse.SERVING:
                    time.sleep(0.1)  # a bench, not a test: polling the health check
            out[component] = process_memory(process.pid)["VmRSS"]
        finally:
            process.terminate()
            process.wait(30)
    return out


def thumbnail_alone(edge: int = 8192, repeats: int = 5) -> dict:
    """reduce-thumbnail edge² -> 1024² through the TileEngine in-process: input tiles (512²,
    row-major, made beforehand) fed from memory; the time from the first tile in to the last
    tile out."""
    pixels = np.random.default_rng(3).integers(0, 256, (edge, edge, 3), dtype=np.uint8)
    source = tiles_pb2.Canvas(id=0, width=edge, height=edge, format=tiles_pb2.PIXEL_FORMAT_RGB8, role=tiles_pb2.CANVAS_ROLE_IMAGE)
    messages = [stage_pb2.StageInput(tile=tile_message(0, rect, pixels)) for rect in transport_grid(edge, edge, 512)]
    del pixels
    walls = []
    for _ in range(repeats):
        stage = load_all()["reduce-thumbnail"].create("thumb", {"width": 1024, "height": 1024}, Context("bench", Settings()))
        outputs = plan_outputs(stage, [source], Settings())
        engine = TileEngine(stage, [source], outputs, 512)

        async def feed():
            for m in messages:
                yield m
            yield stage_pb2.StageInput(end=stage_pb2.InputEnd())

        async def run() -> int:
            n = 0
            async for out in engine.run(feed()):
                n += out.WhichOneof("kind") == "tile"
            return n

        t0 = time.perf_counter()
        tiles = asyncio.run(run())
        walls.append(time.perf_counter() - t0)
        assert tiles == 4, tiles
    return {"walls": walls, "wall": med(walls), "held": engine.peak_input, "load": os.getloadavg()[0]}


def report(runs: list[dict], thumb: dict, idle: dict[str, int], before: dict[str, int] | None) -> list[str]:
    small, big = runs[0], runs[-1]
    lines = [
        "Chain: `source-noise(uniform, N²) -> upscale-simple(x2, lanczos) -> reduce-thumbnail(1024², lanczos) -> "
        "persist-disk(png)` through the gateway, TILE_RETURN_NONE, transport tiles 512², a fresh stack per size "
        "(TILECHAIN_MAX_PIXELS raised to (2N)² for it). Peak = VmHWM during the job; idle = RSS after start-up.",
        "",
        "| process | " + " | ".join(f"idle / peak / **peak − idle**, N = {r['edge']}" for r in runs)
        + f" | ratio {big['edge']}/{small['edge']} |",
        "| --- | " + " | ".join("---" for _ in runs) + " | --- |",
    ]
    for c in COMPONENTS:
        cells = [f"{mib(r['idle'][c])} / {mib(r['peak'][c])} / **{mib(r['rise'][c])}**" for r in runs]
        ratio = big["rise"][c] / max(1, small["rise"][c])
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {ratio:.2f}x |")
    lines += [
        "",
        "Engine peaks per stream (ServiceStats: input pixels held / output pixels not yet sent): "
        + "; ".join(
            f"N = {r['edge']}: " + ", ".join(f"{c} {r['engine'][c][0] / 2**20:.1f} / {r['engine'][c][1] / 2**20:.1f} MiB" for c in SERVICES)
            for r in runs
        )
        + ".",
        "",
        "Job wall time: " + ", ".join(f"N = {r['edge']}: {r['wall']:.1f} s" for r in runs) + ".",
        "",
        f"**reduce-thumbnail 8192² → 1024²** (lanczos), in-process through the TileEngine, 256 input tiles of 512² fed "
        f"from memory: **{thumb['wall']:.2f} s** median, {min(thumb['walls']):.2f} s fastest (runs {', '.join(f'{w:.2f}' for w in thumb['walls'])}; "
        f"1-minute load average {thumb['load']:.1f} after them, on {os.cpu_count()} cores); "
        f"it held at most {thumb['held'] / 2**20:.1f} MiB of input and reduced rows.",
        "",
        "Idle RSS per process (started alone, once SERVING, before any request; no preload): "
        + ", ".join(f"{c} {mib(v)}" + (f" (was {mib(before[c])})" if before else "") for c, v in idle.items())
        + ("" if not before else "; \"was\": the same measurement on the code before issue 11 (--compare-launcher)") + ".",
    ]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edges", default="2048,8192")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--compare-launcher", default="", help="a script that runs another checkout's `tilechain` (for the idle RSS 'was' figures)")
    args = parser.parse_args()
    info = machine()
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tilechain-bench-idle-") as tmp:
        idle = idle_rss([sys.executable, "-m", "tilechain.cli"], Path(tmp))
        before = idle_rss([sys.executable, args.compare_launcher], Path(tmp)) if args.compare_launcher else None
    print("idle", idle, "before", before)
    thumb = thumbnail_alone()
    print(f"thumbnail 8192->1024: {thumb['wall']:.2f} s")
    runs = []
    with tempfile.TemporaryDirectory(prefix="tilechain-bench-memory-") as tmp:
        for edge in (int(e) for e in args.edges.split(",")):
            runs.append(run_size(edge, Path(tmp)))
            print(json.dumps({k: v for k, v in runs[-1].items()}, default=str))
    lines = report(runs, thumb, idle, before)
    lines.append(f"\nBench wall time {time.perf_counter() - began:.0f} s.")
    block = results_block(BEGIN, END, "bench_memory.py", info, "no GPU", "", "`make bench` (`python bench/bench_memory.py`)",
                          lines, title="Memory against image size (issue 11)")
    publish(BEGIN, END, block, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
