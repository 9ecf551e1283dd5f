"""`make bench`: a 4096x4096 chain of upscale-simple and reduce stages, through the gateway and the
real stage services, against the same stage code run in-process and against a raw gRPC echo.

Prints, and records in bench/RESULTS.md (between the bench:begin/end markers; the rest of that
file is written by hand):
  * the gateway chain's wall time (request sent -> final status event received by the client)
    against the same stages run in-process through the same TileEngine, without gRPC (ratio);
  * the tiles/s and MB/s the gateway moves during that chain against a bare gRPC bidi echo
    stream on the same machine, with the same message size and message count;
  * the gateway's RSS before the runs and its peak RSS (VmHWM) after them.

The headline chain resamples with lanczos (the stages' default); the same chain with
method=nearest is run as well, where the stage code is cheap and the transport shows.

Run: python bench/bench_chain.py [--repeats N] [--no-write]      (MB = 10^6 bytes throughout)
"""

from __future__ import annotations

import os

# numpy's BLAS single-threaded, as the services run it (tilechain/cli.py); before numpy loads
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import asyncio
import datetime as dt
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from tilechain.client import TileAssembler, chain_request, connect
from tilechain.services.core.codecs import FORMAT_FOR_CHANNELS, decode_image, encode_image, split_tiles, transport_edge
from tilechain.services.core.config import Settings, channel_options
from tilechain.services.core.engine import TileEngine, plan_outputs
from tilechain.services.core.stage import IMAGE, Context, load_all
from tilechain.services.core.tiles import transport_grid
from tilechain.ports import unused_port
from tilechain.stack import Stack, process_memory
from tilechain.v1 import gateway_pb2, stage_pb2, tiles_pb2

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

SOURCE_EDGE = 1024     # the attached random RGB PNG is 1024x1024
TRANSPORT_TILE = 512   # 512x512x3 = 786,432 bytes per transport tile
MB = 1e6
ATTACH_STAGE = "load"
COMPONENTS = ("source", "upscale", "reduce", "gateway")  # the services this chain uses, and the gateway


PASS_EDGE = 4096  # the near-free chain's canvas


def make_passthrough() -> dict:
    """A near-free chain: noise made per tile, then three stages that pass every tile on
    unchanged (a crop of the whole canvas): what is left is the transport."""
    crop = {"left": 0, "top": 0, "width": PASS_EDGE, "height": PASS_EDGE}
    return {"stages": [
        {"name": "noise", "type": "source-noise", "params": {"width": PASS_EDGE, "height": PASS_EDGE, "seed": 5}},
        *({"name": f"pass{i}", "type": "reduce-crop", "params": crop} for i in (1, 2, 3)),
    ]}


def attachments_of(chain: dict, png: bytes) -> list[tuple[str, str, bytes]]:
    return [(ATTACH_STAGE, "image", png)] if any(s["name"] == ATTACH_STAGE for s in chain["stages"]) else []


def make_chain(method: str) -> dict:
    return {
        "stages": [
            {"name": "load", "type": "source-image"},
            {"name": "up", "type": "upscale-simple", "params": {"scale": 4, "method": method}},  # -> 4096x4096
            {"name": "crop", "type": "reduce-crop", "params": {"left": 512, "top": 512, "width": 3072, "height": 3072}},
            {"name": "thumb", "type": "reduce-thumbnail", "params": {"width": 1024, "height": 1024, "method": method}},
        ]
    }


# --- machine and process facts ------------------------------------------------------------

def machine() -> dict[str, str]:
    import PIL

    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        rev = (rev or "unknown") + (" + uncommitted changes" if dirty else "")
    except OSError:
        rev = "unknown"
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "libs": f"grpcio {grpc.__version__}, numpy {np.__version__}, pillow {PIL.__version__}",
        "rev": rev,
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }


TICK = os.sysconf("SC_CLK_TCK")


def reset_peak(pid: int) -> bool:
    """Reset a process's VmHWM to its current RSS (Linux: "5" to /proc/PID/clear_refs)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def free_port() -> int:
    return unused_port("127.0.0.1")


def med(values) -> float:
    return statistics.median(list(values))


# --- the chain, in-process ----------------------------------------------------------------

class InProcessChain:
    """The chain's stages through the same TileEngine, piped by async generators instead of gRPC:
    stage N's output tiles become stage N+1's StageInput tiles, its planned output canvases
    (ids kept) become stage N+1's inputs, the attachment is numbered after them as plan_chain
    numbers it. Planning, PNG decoding and the attachment split are inside the timed run, as
    they are inside the gateway's."""

    def __init__(self, chain: dict, png: bytes) -> None:
        self.chain = chain
        self.png = png
        self.classes = load_all()
        self.compute_cpu: dict[str, float] = {}   # thread CPU seconds inside stage code, per stage
        self.final: np.ndarray | None = None
        self.tiles_out: list[int] = []            # transport tiles each stage emitted
        self.bytes_out: list[int] = []

    async def _run(self) -> None:
        settings = Settings()
        pixels = decode_image(self.png) if attachments_of(self.chain, self.png) else np.zeros((1, 1, 3), np.uint8)
        height, width, chans = pixels.shape
        engines: list[TileEngine] = []
        attachments: list[list[tiles_pb2.Tile]] = []
        previous: list[tiles_pb2.Canvas] = []
        for spec in self.chain["stages"]:
            name = spec["name"]
            stage = self.classes[spec["type"]].create(name, spec.get("params", {}), Context("inprocess", settings))
            inputs = list(previous)
            attached: list[tiles_pb2.Tile] = []
            if name == ATTACH_STAGE:
                canvas = tiles_pb2.Canvas(
                    id=len(inputs), width=width, height=height, format=FORMAT_FOR_CHANNELS[chans], role=IMAGE, attached=True
                )
                inputs.append(canvas)
                attached = list(split_tiles(canvas.id, pixels, TRANSPORT_TILE))
            outputs = plan_outputs(stage, inputs, settings)
            engine = TileEngine(stage, inputs, outputs, TRANSPORT_TILE)
            self._time_compute(engine, name)
            engines.append(engine)
            attachments.append(attached)
            previous = [o.canvas for o in outputs]
        self.tiles_out = [0] * len(engines)
        self.bytes_out = [0] * len(engines)

        async def feed(index: int):
            for tile in attachments[index]:
                yield stage_pb2.StageInput(tile=tile)
            if index > 0:
                async for out in engines[index - 1].run(feed(index - 1)):
                    if out.WhichOneof("kind") == "tile":
                        self.tiles_out[index - 1] += 1
                        self.bytes_out[index - 1] += len(out.tile.pixels)
                        yield stage_pb2.StageInput(tile=out.tile)
            yield stage_pb2.StageInput(end=stage_pb2.InputEnd())

        last = len(engines) - 1
        final = engines[last].outputs[0]
        self.final = np.zeros((final.height, final.width, final.chans), dtype=final.dtype)
        async for out in engines[last].run(feed(last)):
            if out.WhichOneof("kind") == "tile":
                t = out.tile
                self.tiles_out[last] += 1
                self.bytes_out[last] += len(t.pixels)
                if t.canvas_id == 0:
                    self.final[t.y : t.y + t.height, t.x : t.x + t.width] = np.frombuffer(t.pixels, final.dtype).reshape(t.height, t.width, -1)

    def _time_compute(self, engine: TileEngine, name: str) -> None:
        """Thread CPU in the stage code: process_tile / process_canvas (in a worker thread), or
        stream_tile for streaming stages."""
        stage = engine.stage
        self.compute_cpu[name] = 0.0
        for attr in ("process_tile", "process_canvas", "stream_tile"):
            inner = getattr(stage, attr)

            def timed(*args, inner=inner):
                t = time.thread_time()
                try:
                    return inner(*args)
                finally:
                    self.compute_cpu[name] += time.thread_time() - t

            setattr(stage, attr, timed)

    def run(self) -> dict:
        cpu0, t0 = self_cpu(), time.perf_counter()
        asyncio.run(self._run())
        return {"wall": time.perf_counter() - t0, "cpu": self_cpu() - cpu0, "compute": dict(self.compute_cpu)}


# --- the chain, through the gateway -------------------------------------------------------

class GatewayChain:
    def __init__(self, stack: Stack, chain: dict, png: bytes) -> None:
        self.chain = chain
        self.png = png
        self.stub = connect(stack.addresses["gateway"])
        self.pids = {c: stack.processes[c].pid for c in COMPONENTS}

    def run(self, return_tiles: int) -> dict:
        """One RunChain, timed from sending the request to receiving the final status event."""
        request = chain_request(self.chain, attachments_of(self.chain, self.png), return_tiles=return_tiles)
        gateway = self.pids["gateway"]
        peak_reset = reset_peak(gateway)
        rss_before = process_memory(gateway)["VmRSS"]
        cpu0 = {c: cpu_seconds(p) for c, p in self.pids.items()}
        client0 = self_cpu()
        tiles: dict[str, int] = {}
        tile_bytes: dict[str, int] = {}
        assembler = TileAssembler()
        status = None
        t0 = time.perf_counter()
        for event in self.stub.RunChain(request, timeout=600):
            kind = event.WhichOneof("kind")
            if kind == "tile":
                name = event.tile.name
                tiles[name] = tiles.get(name, 0) + 1
                tile_bytes[name] = tile_bytes.get(name, 0) + len(event.tile.tile.pixels)
                if return_tiles == gateway_pb2.TILE_RETURN_FINAL:
                    assembler.add(event.tile)
            elif kind == "status":
                status = event.status
        wall = time.perf_counter() - t0
        if status is None or status.state != gateway_pb2.JOB_STATE_SUCCEEDED:
            raise RuntimeError(f"the gateway chain did not succeed: {status}")
        cpu = {c: cpu_seconds(p) - cpu0[c] for c, p in self.pids.items()}
        cpu["client"] = self_cpu() - client0
        after = process_memory(gateway)
        rss = {"before": rss_before, "peak": after["VmHWM"] if peak_reset else None, "after": after["VmRSS"]}
        final = assembler.images.get((self.chain["stages"][-1]["name"], 0))
        return {"wall": wall, "cpu": cpu, "tiles": tiles, "bytes": tile_bytes, "final": final, "rss": rss}


def transport_counts(inprocess: InProcessChain) -> dict:
    """Tiles and bytes that cross the gateway in one run of the chain, from the stages' outputs:
    in  = every tile a stage streams to the gateway (all stages' output canvases);
    out = every tile the gateway streams to a stage (the attachment + stages 1..N-1's inputs)."""
    pixels = decode_image(inprocess.png)
    h, w, c = pixels.shape
    edge = transport_edge(TRANSPORT_TILE, c)
    names = [s["name"] for s in inprocess.chain["stages"]]
    attach_tiles, attach_bytes = len(transport_grid(w, h, edge)), h * w * c
    if not attachments_of(inprocess.chain, inprocess.png):
        attach_tiles = attach_bytes = 0
    return {
        "per_stage_tiles": dict(zip(names, inprocess.tiles_out)),
        "per_stage_bytes": dict(zip(names, inprocess.bytes_out)),
        "in_tiles": sum(inprocess.tiles_out), "in_bytes": sum(inprocess.bytes_out),
        "out_tiles": attach_tiles + sum(inprocess.tiles_out[:-1]), "out_bytes": attach_bytes + sum(inprocess.bytes_out[:-1]),
        "tile_bytes": edge * edge * c,
    }


def bench_chain(label: str, chain: dict, stack: Stack, png: bytes, repeats: int, log) -> dict:
    """Warm-up, then `repeats` alternating gateway (TILE_RETURN_NONE) and in-process runs, then
    one TILE_RETURN_FINAL run (its image checked against the in-process one) and one
    TILE_RETURN_ALL run (its tile events checked against the planned transport tiles)."""
    gw = GatewayChain(stack, chain, png)
    inprocess = InProcessChain(chain, png)
    gw.run(gateway_pb2.TILE_RETURN_NONE)
    inprocess.run()
    counts = transport_counts(inprocess)
    gw_runs, ip_runs = [], []
    for i in range(repeats):
        gw_runs.append(gw.run(gateway_pb2.TILE_RETURN_NONE))
        ip_runs.append(inprocess.run())
        log(f"  {label} run {i + 1}/{repeats}: gateway {gw_runs[-1]['wall']:.2f} s, in-process {ip_runs[-1]['wall']:.2f} s")
    final = gw.run(gateway_pb2.TILE_RETURN_FINAL)
    everything = gw.run(gateway_pb2.TILE_RETURN_ALL)
    names = [s["name"] for s in chain["stages"]]
    events_match = all(
        everything["tiles"].get(n, 0) == counts["per_stage_tiles"][n] and everything["bytes"].get(n, 0) == counts["per_stage_bytes"][n]
        for n in names
    )
    gw_wall = med(r["wall"] for r in gw_runs)
    ip_wall = med(r["wall"] for r in ip_runs)
    return {
        "label": label, "chain": chain, "counts": counts,
        "gw_wall": gw_wall, "gw_walls": [r["wall"] for r in gw_runs],
        "ip_wall": ip_wall, "ip_walls": [r["wall"] for r in ip_runs], "ratio": gw_wall / ip_wall,
        "gw_cpu": {k: med(r["cpu"][k] for r in gw_runs) for k in gw_runs[0]["cpu"]},
        "ip_cpu": med(r["cpu"] for r in ip_runs),
        "compute": {n: med(r["compute"][n] for r in ip_runs) for n in names},
        "in_tps": counts["in_tiles"] / gw_wall, "in_mbps": counts["in_bytes"] / gw_wall / MB,
        "out_tps": counts["out_tiles"] / gw_wall, "out_mbps": counts["out_bytes"] / gw_wall / MB,
        "final_wall": final["wall"], "all_wall": everything["wall"],
        "identical": final["final"] is not None and np.array_equal(final["final"], inprocess.final),
        "events_match": events_match,
        "rss_runs": [r["rss"] for r in gw_runs], "rss_final": final["rss"], "rss_all": everything["rss"],
        "jobs": repeats + 3,
    }


# --- the raw gRPC echo baseline -----------------------------------------------------------

def start_echo() -> tuple[subprocess.Popen, str]:
    address = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen(
        [sys.executable, str(HERE / "echo_server.py"), address],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )
    with grpc.insecure_channel(address) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
    return process, address


async def _echo(address: str, kind: str, count: int, size: int, repeats: int) -> list[dict]:
    sys.path.insert(0, str(HERE))
    from echo_server import RAW, TILE

    payload = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    if kind == "raw":
        messages: list = [payload] * count
        ser = de = None
        length = len
    else:
        edge = int(round((size // 3) ** 0.5))
        tile = tiles_pb2.Tile(canvas_id=0, x=0, y=0, width=edge, height=edge, pixels=payload)
        messages = [stage_pb2.StageInput(tile=tile) for _ in range(count)]
        ser, de = stage_pb2.StageInput.SerializeToString, stage_pb2.StageOutput.FromString
        length = lambda reply: len(reply.tile.pixels)  # noqa: E731
    results = []
    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        method = channel.stream_stream(RAW if kind == "raw" else TILE, request_serializer=ser, response_deserializer=de)
        for attempt in range(repeats + 1):  # the first is a warm-up

            async def send():
                for m in messages:
                    yield m

            t0 = time.perf_counter()
            n = nbytes = 0
            async for reply in method(send()):
                n += 1
                nbytes += length(reply)
            wall = time.perf_counter() - t0
            if n != count or nbytes != count * size:
                raise RuntimeError(f"echo returned {n} of {count} messages, {nbytes} bytes")
            if attempt:
                results.append({"wall": wall, "bytes": nbytes})
    return results


def echo_bench(count: int, size: int, repeats: int) -> dict[str, dict]:
    """`count` messages of `size` bytes through a bidi echo stream, client -> server -> client,
    the client sending and receiving concurrently (as the gateway pipes tiles)."""
    process, address = start_echo()
    try:
        out = {}
        for kind in ("raw", "tile"):
            cpu0 = cpu_seconds(process.pid)
            runs = asyncio.run(_echo(address, kind, count, size, repeats))
            wall = med(r["wall"] for r in runs)
            out[kind] = {
                "wall": wall, "walls": [r["wall"] for r in runs], "messages": count, "bytes": runs[0]["bytes"],
                "msgs_per_s": count / wall, "mb_per_s": runs[0]["bytes"] / wall / MB,
                "server_cpu": (cpu_seconds(process.pid) - cpu0) / (repeats + 1),
            }
        return out
    finally:
        process.terminate()
        process.wait(10)


# --- per-tile copies micro-benchmark ------------------------------------------------------

MALLOC_KEEP = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


def micro() -> dict[str, float]:
    """Per 512x512x3 tile, in this process, in ms of thread CPU with the minor page faults they
    cause: the copies a tile went through between two stages with protobuf messages (tile_message
    cut from the output canvas, the StageOutput carrying it, the StageInput the gateway built,
    serialising it: "ms"), and what the services do now (core/wire.py: encode_tile writes the
    serialised message from the array in one copy, the gateway forwards the bytes, and the next
    stage reads the header and views the pixels: "wire_ms")."""
    from tilechain.services.core.codecs import tile_message
    from tilechain.services.core.tiles import Rect
    from tilechain.services.core.wire import encode_tile, parse_stage_input

    canvas = np.random.default_rng(1).integers(0, 256, (4096, 4096, 3), dtype=np.uint8)
    rects = [Rect(x, y, 512, 512) for y in range(0, 4096, 512) for x in range(0, 4096, 512)]

    def protobuf(rect: Rect) -> None:
        out = stage_pb2.StageOutput(tile=tile_message(0, rect, canvas))
        stage_pb2.StageInput(tile=out.tile).SerializeToString()

    def wire(rect: Rect) -> None:
        np.frombuffer(parse_stage_input(encode_tile(0, rect, canvas[rect.slices])).pixels, np.uint8)

    result = {}
    for key, path in (("ms", protobuf), ("wire_ms", wire)):
        best = (float("inf"), 0.0)
        for _ in range(3):
            faults, t = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.thread_time()
            for rect in rects:
                path(rect)
            ms = (time.thread_time() - t) / len(rects) * 1e3
            best = min(best, (ms, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / len(rects)))
        result[key], result[key.replace("ms", "faults")] = best
    return result


def micro_both() -> dict[str, dict[str, float]]:
    """micro() in a fresh interpreter with glibc's defaults and with MALLOC_KEEP set."""
    import json

    out = {}
    for key, extra in (("default", {}), ("keep", MALLOC_KEEP)):
        env = {k: v for k, v in os.environ.items() if k not in MALLOC_KEEP}
        env.update(extra)
        text = subprocess.run([sys.executable, __file__, "--micro"], env=env, capture_output=True, text=True, check=True).stdout
        out[key] = json.loads(text)
    return out


# --- report -------------------------------------------------------------------------------

def describe(chain: dict) -> str:
    parts = []
    for s in chain["stages"]:
        params = ", ".join(f"{k}={v}" for k, v in s.get("params", {}).items())
        parts.append(f"{s['type']}({params})" if params else s["type"])
    return " -> ".join(parts)


def secs(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def mib(kb: int) -> str:
    return f"{kb / 1024:.0f} MiB"


def rss_rows(r: dict) -> list[str]:
    head, light = r["head"], r["light"]
    runs = head["rss_runs"]
    rows = [f"| gateway RSS after start-up, before any job | {mib(r['rss_idle']['VmRSS'])} |"]
    if all(x["peak"] is not None for x in runs + [head["rss_final"], head["rss_all"]]):
        peaks = [x["peak"] for x in runs]
        rise = [x["peak"] - x["before"] for x in runs]
        rows += [
            f"| **gateway peak RSS** (VmHWM, reset before each run) during one NONE run | **{mib(max(peaks))}** at most "
            f"(runs {', '.join(mib(p) for p in peaks)}); peak − RSS at the run's start: median {mib(med(rise))} |",
            f"| same, peak − start, for the TILE_RETURN_FINAL / TILE_RETURN_ALL run | "
            f"{mib(head['rss_final']['peak'] - head['rss_final']['before'])} / {mib(head['rss_all']['peak'] - head['rss_all']['before'])} |",
        ]
    else:
        rows.append(f"| gateway peak RSS (VmHWM since start; clear_refs refused) | {mib(r['rss_end']['VmHWM'])} |")
    kept = [x["after"] - x["before"] for x in runs]
    rows += [
        f"| gateway RSS kept after each NONE run (RSS after − before, median) | {mib(med(kept))} |",
        f"| gateway RSS at the end, after {head['jobs'] + light['jobs']} jobs | {mib(r['rss_end']['VmRSS'])} |",
    ]
    return rows


def report(r: dict) -> list[str]:
    head, light, raw, pb, near = r["head"], r["light"], r["echo"]["raw"], r["echo"]["tile"], r["pass"]
    c = head["counts"]
    lines = [
        f"Chain: `{describe(head['chain'])}`, from an attached {SOURCE_EDGE}x{SOURCE_EDGE} random RGB PNG "
        f"({r['png_bytes'] / MB:.1f} MB); canvases 1024² → 4096² → 3072² → 1024², RGB8. "
        f"Transport tiles {TRANSPORT_TILE}x{TRANSPORT_TILE}x3 = {c['tile_bytes']:,} B. "
        f"Times are medians of {r['repeats']} runs after one warm-up run; MB = 10^6 B.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| gateway chain wall time, TILE_RETURN_NONE (request → final status) | **{head['gw_wall']:.2f} s** (runs {secs(head['gw_walls'])}) |",
        f"| same stages in-process (same TileEngine, no gRPC) | **{head['ip_wall']:.2f} s** (runs {secs(head['ip_walls'])}) |",
        f"| ratio gateway / in-process | **{head['ratio']:.2f}x** |",
        f"| gateway chain, TILE_RETURN_FINAL / TILE_RETURN_ALL (one run each) | {head['final_wall']:.2f} s / {head['all_wall']:.2f} s |",
        f"| tiles through the gateway per chain | in (stages → gateway) {c['in_tiles']} tiles, {c['in_bytes'] / MB:.1f} MB; "
        f"out (gateway → stages) {c['out_tiles']} tiles, {c['out_bytes'] / MB:.1f} MB |",
        f"| gateway throughput during the chain | **{head['in_tps']:.1f} tiles/s, {head['in_mbps']:.1f} MB/s** in "
        f"(and {head['out_tps']:.1f} tiles/s, {head['out_mbps']:.1f} MB/s out) |",
        f"| raw gRPC echo stream, bytes, {raw['messages']} x {c['tile_bytes']:,} B | **{raw['msgs_per_s']:.0f} msgs/s, {raw['mb_per_s']:.0f} MB/s** each way "
        f"(runs {', '.join(f'{w:.3f}' for w in raw['walls'])} s) |",
        f"| gRPC echo stream, StageInput tile → StageOutput tile (protobuf), same sizes | {pb['msgs_per_s']:.0f} msgs/s, {pb['mb_per_s']:.0f} MB/s each way |",
        f"| gateway chain throughput as a share of the raw echo | {head['in_mbps'] / raw['mb_per_s'] * 100:.1f}% |",
        *rss_rows(r),
        "",
        f"Same chain with method=nearest (cheap stage code, so the transport shows): gateway **{light['gw_wall']:.2f} s** "
        f"(runs {secs(light['gw_walls'])}), in-process **{light['ip_wall']:.2f} s** (runs {secs(light['ip_walls'])}), "
        f"ratio **{light['ratio']:.2f}x**; through the gateway {light['in_tps']:.0f} tiles/s, {light['in_mbps']:.0f} MB/s in "
        f"({light['in_mbps'] / raw['mb_per_s'] * 100:.0f}% of the raw echo).",
        "",
        f"**Near-free chain** `{describe(near['chain'])}` ({PASS_EDGE}² RGB, {near['counts']['in_tiles']} tiles of "
        f"{near['counts']['tile_bytes']:,} B and {near['counts']['in_bytes'] / MB:.0f} MB into the gateway per run): gateway "
        f"**{near['gw_wall']:.2f} s** (runs {secs(near['gw_walls'])}), in-process {near['ip_wall']:.2f} s (runs {secs(near['ip_walls'])}); "
        f"through the gateway **{near['in_mbps']:.0f} MB/s in = {near['in_mbps'] / raw['mb_per_s'] * 100:.0f}% of the raw echo** "
        f"({near['in_tps']:.0f} tiles/s; and {near['out_mbps']:.0f} MB/s out to the stages).",
        "",
        "Where the CPU goes (seconds per chain run, medians):",
        "",
        "| | lanczos | nearest |",
        "| --- | --- | --- |",
    ]
    for name in head["compute"]:
        lines.append(f"| stage code `{name}` (thread CPU in its process_tile, process_canvas or stream_tile, in-process) | {head['compute'][name]:.2f} | {light['compute'][name]:.2f} |")
    lines.append(f"| stage code, all stages | {sum(head['compute'].values()):.2f} | {sum(light['compute'].values()):.2f} |")
    lines.append(f"| in-process run, whole process | {head['ip_cpu']:.2f} | {light['ip_cpu']:.2f} |")
    for comp in head["gw_cpu"]:
        what = "the bench client (RunChain caller)" if comp == "client" else f"the {comp} process"
        lines.append(f"| gateway run, {what} | {head['gw_cpu'][comp]:.2f} | {light['gw_cpu'][comp]:.2f} |")
    lines.append(f"| gateway run, all processes | {sum(head['gw_cpu'].values()):.2f} | {sum(light['gw_cpu'].values()):.2f} |")
    lines += [
        "",
        f"Echo server CPU per {raw['messages']}-message run: raw {raw['server_cpu']:.2f} s, protobuf tile {pb['server_cpu']:.2f} s. "
        f"Wall time of the echo runs: raw {raw['wall']:.3f} s, protobuf {pb['wall']:.3f} s.",
        "",
        "Copies per tile between two stages, thread CPU per 786,432 B tile: with protobuf messages as before "
        "(tile_message → StageOutput → StageInput → serialised) "
        f"{r['micro']['default']['ms']:.2f} ms and {r['micro']['default']['faults']:.0f} minor page faults with glibc's malloc defaults, "
        f"{r['micro']['keep']['ms']:.2f} ms and {r['micro']['keep']['faults']:.0f} faults with "
        + " ".join(f"{k}={v}" for k, v in MALLOC_KEEP.items())
        + f"; as the services and gateway do now (core/wire.py: encode_tile, bytes forwarded, parse_stage_input) "
        f"{r['micro']['default']['wire_ms']:.2f} ms / {r['micro']['default']['wire_faults']:.0f} faults and "
        f"{r['micro']['keep']['wire_ms']:.2f} ms / {r['micro']['keep']['wire_faults']:.0f} faults.",
        "",
        "Peak RSS (VmHWM since start) of the stage services: " + ", ".join(f"{k} {mib(v)}" for k, v in r["services_hwm"].items()) + ".",
        "",
        f"Checks: the gateway's final image equals the in-process one: lanczos {head['identical']}, nearest {light['identical']}; "
        f"the TILE_RETURN_ALL run's tile events equal the stages' planned output tiles: lanczos {head['events_match']}, nearest {light['events_match']}.",
        f"Bench wall time {r['elapsed']:.0f} s; 1-minute load average {r['load'][0]:.2f} at the start, {r['load'][1]:.2f} at the end "
        "(the bench itself keeps both cores busy; a much higher start value means something else was running).",
    ]
    return lines


def write_results(r: dict, lines: list[str]) -> None:
    i = r["info"]
    block = results_block(BEGIN, END, "bench_chain.py", i, "no GPU", f"Python {i['python']}, {i['libs']}",
                          "`make bench` (`python bench/bench_chain.py`)", lines)
    write_section(BEGIN, END, block, "# Benchmark: a 4096x4096 chain through the gateway")


def results_block(begin: str, end: str, script: str, info: dict, hardware: str, versions: str, command: str,
                  lines: list[str], title: str = "") -> str:
    """A bench's RESULTS.md section: its markers, who wrote it, the title, the machine, the
    versions and the command, then its lines."""
    head = [begin, f"<!-- written by `make bench` (bench/{script}); edit outside the markers -->", ""]
    if title:
        head += [f"## {title}", ""]
    head += [
        f"Run {info['date']} on: {info['cpu']}, {info['cores']} cores, {info['ram']} RAM, {info['os']}, {hardware}; "
        f"{versions + '; ' if versions else ''}tilechain {info['rev']}.",
        f"Command: {command}.",
        "",
    ]
    return "\n".join([*head, *lines, end])


def write_section(begin: str, end: str, block: str, heading: str = "") -> None:
    """Put block (which starts with begin and ends with end) into bench/RESULTS.md: in place of
    the old section between the markers, else appended (after heading, if given)."""
    current = RESULTS.read_text() if RESULTS.exists() else ""
    if begin in current and end in current:
        before, rest = current.split(begin, 1)
        RESULTS.write_text(before + block + rest.split(end, 1)[1])
    else:
        lead = current.rstrip() + "\n\n" if current.strip() else ""
        RESULTS.write_text(lead + (heading + "\n\n" if heading else "") + block + "\n")


def publish(begin: str, end: str, block: str, write: bool) -> None:
    """Print a bench's section and, when write (no --no-write), put it into bench/RESULTS.md."""
    print(block)
    if write:
        write_section(begin, end, block)


# --- main ---------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per mode, median reported (default 5)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    parser.add_argument("--micro", action="store_true", help=argparse.SUPPRESS)  # micro() alone, as JSON
    args = parser.parse_args()
    if args.micro:
        import json

        print(json.dumps(micro()))
        return 0
    began = time.perf_counter()

    def log(text: str) -> None:
        print(text, flush=True)

    info = machine()
    load_start = os.getloadavg()[0]
    log(f"machine: {info['cpu']}, {info['cores']} cores, {info['ram']}, Python {info['python']}, tilechain {info['rev']}")
    png = encode_image(np.random.default_rng(2024).integers(0, 256, (SOURCE_EDGE, SOURCE_EDGE, 3), dtype=np.uint8), "png")

    with tempfile.TemporaryDirectory(prefix="tilechain-bench-") as tmp:
        stack = Stack({c: f"127.0.0.1:{free_port()}" for c in COMPONENTS}, Path(tmp) / "logs")
        try:
            stack.start(components=COMPONENTS, extra_env={"TILECHAIN_OUTPUT_ROOT": str(Path(tmp) / "outputs")})
            gateway_pid = stack.processes["gateway"].pid
            rss_idle = process_memory(gateway_pid)
            log(f"stack up ({', '.join(COMPONENTS)}); gateway pid {gateway_pid}, RSS {mib(rss_idle['VmRSS'])}")
            head = bench_chain("lanczos", make_chain("lanczos"), stack, png, args.repeats, log)
            light = bench_chain("nearest", make_chain("nearest"), stack, png, args.repeats, log)
            passthrough = bench_chain("near-free", make_passthrough(), stack, png, args.repeats, log)
            rss_end = process_memory(gateway_pid)
            services_hwm = {c: process_memory(stack.processes[c].pid)["VmHWM"] for c in COMPONENTS if c != "gateway"}
        finally:
            stack.stop()

    log("echo baseline ...")
    echo = echo_bench(head["counts"]["in_tiles"], head["counts"]["tile_bytes"], args.repeats)
    results = {
        "micro": micro_both(), "info": info, "png_bytes": len(png), "repeats": args.repeats, "head": head, "light": light, "pass": passthrough, "echo": echo,
        "rss_idle": rss_idle, "rss_end": rss_end, "services_hwm": services_hwm, "elapsed": time.perf_counter() - began,
        "load": (load_start, os.getloadavg()[0]),
    }
    lines = report(results)
    print()
    print("\n".join(lines))
    if not args.no_write:
        write_results(results, lines)
        print(f"\nwrote {RESULTS.relative_to(ROOT)}")
    failed = [
        what
        for run in (head, light, passthrough)
        for what, ok in (
            (f"{run['label']}: the gateway's final image differs from the in-process one", run["identical"]),
            (f"{run['label']}: TILE_RETURN_ALL tile events differ from the planned transport tiles", run["events_match"]),
        )
        if not ok
    ]
    for what in failed:
        print("ERROR: " + what, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
