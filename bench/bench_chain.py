"""`make bench`: a 4096x4096 chain of upscale-simple and reduce stages, through the gateway and the
real stage services, against the same stage code run in-process and against a raw gRPC echo.

Prints, and records in bench/RESULTS.md (between the bench:begin/end markers):
  * the gateway chain's wall time (request sent -> final status event received by the client)
    against the same stages run in-process through the same TileEngine, without gRPC (ratio);
  * the tiles/s and MB/s the gateway moves during that chain against a bare gRPC bidi echo
    stream on the same machine, with the same message size and byte count;
  * the gateway's RSS before the runs and its peak RSS (VmHWM) after them.

Run: python bench/bench_chain.py [--repeats N] [--no-write]   (MB = 10^6 bytes throughout)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from tilechain.client import TileAssembler, chain_request, connect
from tilechain.services.core.codecs import channels, decode_image, encode_image, split_tiles, transport_edge
from tilechain.services.core.config import Settings, channel_options
from tilechain.services.core.engine import TileEngine, plan_outputs
from tilechain.services.core.stage import IMAGE, Context, load_all
from tilechain.services.core.tiles import transport_grid
from tilechain.stack import Stack
from tilechain.v1 import gateway_pb2, stage_pb2, tiles_pb2

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

SOURCE_EDGE = 1024     # attached random RGB PNG, 1024x1024
TRANSPORT_TILE = 512   # 512x512x3 = 786,432 bytes per transport tile
MB = 1e6

CHAIN = {
    "stages": [
        {"name": "load", "type": "source-image"},
        {"name": "up", "type": "upscale-simple", "params": {"scale": 4, "method": "lanczos"}},  # -> 4096x4096
        {"name": "crop", "type": "reduce-crop", "params": {"left": 512, "top": 512, "width": 3072, "height": 3072}},
        {"name": "thumb", "type": "reduce-thumbnail", "params": {"width": 1024, "height": 1024, "method": "lanczos"}},
    ]
}
ATTACH_STAGE = "load"
COMPONENTS = ("source", "upscale", "reduce", "gateway")  # the services this chain uses, and the gateway


# --- machine and process facts ------------------------------------------------------------

def machine() -> dict[str, str]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    import PIL
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "libs": f"grpcio {grpc.__version__}, numpy {np.__version__}, pillow {PIL.__version__}",
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
    }


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the chain, in-process ----------------------------------------------------------------

class InProcessChain:
    """The chain's stages through the same TileEngine, piped by async generators instead of gRPC.
    Planning (plan_outputs), PNG decoding and the attachment split are inside the timed run, as
    they are inside the gateway's."""

    def __init__(self, png: bytes) -> None:
        self.png = png
        self.classes = load_all()
        self.compute: dict[str, float] = {}
        self.final: np.ndarray | None = None
        self.tiles_out: list[int] = []     # transport tiles each stage emitted
        self.bytes_out: list[int] = []

    async def _run(self) -> None:
        settings = Settings()
        pixels = decode_image(self.png)
        height, width, chans = pixels.shape
        engines: list[TileEngine] = []
        attachments: list[list[tiles_pb2.Tile]] = []
        previous: list[tiles_pb2.Canvas] = []
        for spec in CHAIN["stages"]:
            name = spec["name"]
            stage = self.classes[spec["type"]].create(name, spec.get("params", {}), Context("inprocess", settings))
            inputs = list(previous)
            attached: list[tiles_pb2.Tile] = []
            if name == ATTACH_STAGE:  # numbered after the previous stage's outputs, as plan_chain does
                canvas = tiles_pb2.Canvas(
                    id=len(inputs), width=width, height=height, format={3: tiles_pb2.PIXEL_FORMAT_RGB8, 4: tiles_pb2.PIXEL_FORMAT_RGBA8}[chans],
                    role=IMAGE, attached=True,
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
        async for out in engines[last].run(feed(last)):
            if out.WhichOneof("kind") == "tile":
                self.tiles_out[last] += 1
                self.bytes_out[last] += len(out.tile.pixels)
        self.final = engines[last].outputs[0].pixels

    def _time_compute(self, engine: TileEngine, name: str) -> None:
        inner = engine._compute  # stage code (process_tile/process_canvas), run in a worker thread
        self.compute[name] = 0.0

        def timed(job):
            t = time.perf_counter()
            try:
                return inner(job)
            finally:
                self.compute[name] += time.perf_counter() - t

        engine._compute = timed  # type: ignore[method-assign]

    def run(self) -> tuple[float, float]:
        """Wall seconds and CPU seconds of one run."""
        cpu0, t0 = self_cpu(), time.perf_counter()
        asyncio.run(self._run())
        return time.perf_counter() - t0, self_cpu() - cpu0


# --- the chain, through the gateway -------------------------------------------------------

class GatewayRun:
    def __init__(self, stack: Stack, png: bytes) -> None:
        self.stack = stack
        self.png = png
        self.stub = connect(stack.addresses["gateway"])
        self.pids = {c: stack.processes[c].pid for c in COMPONENTS}

    def run(self, return_tiles: int) -> dict:
        request = chain_request(CHAIN, [(ATTACH_STAGE, "image", self.png)], return_tiles=return_tiles)
        cpu0 = {c: cpu_seconds(p) for c, p in self.pids.items()}
        client0 = self_cpu()
        tiles: dict[str, int] = {}
        tile_bytes: dict[str, int] = {}
        assembler = TileAssembler()
        t0 = time.perf_counter()
        status = None
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
            raise RuntimeError(f"gateway chain did not succeed: {status}")
        cpu = {c: cpu_seconds(p) - cpu0[c] for c, p in self.pids.items()}
        cpu["client"] = self_cpu() - client0
        final = assembler.images.get((CHAIN["stages"][-1]["name"], 0))
        return {"wall": wall, "cpu": cpu, "tiles": tiles, "bytes": tile_bytes, "final": final}


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

    rng = np.random.default_rng(0)
    payload = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    if kind == "raw":
        messages = [payload] * count
        ser, de, length = None, None, len
    else:
        edge = int(round((size // 3) ** 0.5))
        messages = [stage_pb2.StageInput(tile=tiles_pb2.Tile(canvas_id=0, x=0, y=0, width=edge, height=edge, pixels=payload))] * count
        ser, de = stage_pb2.StageInput.SerializeToString, stage_pb2.StageOutput.FromString
        length = lambda reply: len(reply.tile.pixels)  # noqa: E731
    results = []
    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        method = channel.stream_stream(RAW if kind == "raw" else TILE, request_serializer=ser, response_deserializer=de)
        for attempt in range(repeats + 1):  # the first is a warm-up
            async def send():
                for m in messages:
                    yield m

            pid_cpu0, client0, t0 = None, self_cpu(), time.perf_counter()
            n = nbytes = 0
            async for reply in method(send()):
                n += 1
                nbytes += length(reply)
            wall = time.perf_counter() - t0
            if n != count:
                raise RuntimeError(f"echo returned {n} of {count} messages")
            if attempt:
                results.append({"wall": wall, "messages": n, "bytes": nbytes, "client_cpu": self_cpu() - client0})
    return results


def echo_bench(count: int, size: int, repeats: int) -> dict[str, dict]:
    process, address = start_echo()
    try:
        out = {}
        for kind in ("raw", "tile"):
            cpu0 = cpu_seconds(process.pid)
            runs = asyncio.run(_echo(address, kind, count, size, repeats))
            server_cpu = (cpu_seconds(process.pid) - cpu0) / (repeats + 1)
            wall = statistics.median(r["wall"] for r in runs)
            out[kind] = {
                "wall": wall, "walls": [r["wall"] for r in runs], "messages": count, "bytes": runs[0]["bytes"],
                "msgs_per_s": count / wall, "mb_per_s": runs[0]["bytes"] / wall / MB,
                "server_cpu": server_cpu, "client_cpu": statistics.median(r["client_cpu"] for r in runs),
            }
        return out
    finally:
        process.terminate()
        process.wait(10)


# --- accounting -------------------------------------------------------------------------

def transport_counts(inprocess: InProcessChain) -> dict:
    """Tiles and bytes that cross the gateway for one chain run, from the planned canvases:
    in = every tile a stage streams to the gateway (each stage's output canvases);
    out = every tile the gateway streams to a stage (attachments + the previous stage's output)."""
    pixels = decode_image(inprocess.png)
    h, w, c = pixels.shape
    edge = transport_edge(TRANSPORT_TILE, c)
    attach_tiles = len(transport_grid(w, h, edge))
    attach_bytes = h * w * c
    stages = [s["name"] for s in CHAIN["stages"]]
    tiles_in = dict(zip(stages, inprocess.tiles_out))
    bytes_in = dict(zip(stages, inprocess.bytes_out))
    forwarded_tiles = sum(inprocess.tiles_out[:-1])
    forwarded_bytes = sum(inprocess.bytes_out[:-1])
    return {
        "per_stage_tiles": tiles_in, "per_stage_bytes": bytes_in,
        "in_tiles": sum(tiles_in.values()), "in_bytes": sum(bytes_in.values()),
        "out_tiles": attach_tiles + forwarded_tiles, "out_bytes": attach_bytes + forwarded_bytes,
        "attach_tiles": attach_tiles, "attach_bytes": attach_bytes,
        "forwarded_tiles": forwarded_tiles, "forwarded_bytes": forwarded_bytes,
        "tile_bytes": edge * edge * c,
    }


def med(values) -> float:
    return statistics.median(list(values))


def fmt_s(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


# --- main -------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median reported); default 3")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    began = time.perf_counter()
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['ram']}, Python {info['python']}, {info['date']}", flush=True)

    rng = np.random.default_rng(2024)
    png = encode_image(rng.integers(0, 256, (SOURCE_EDGE, SOURCE_EDGE, 3), dtype=np.uint8), "png")
    inprocess = InProcessChain(png)

    with tempfile.TemporaryDirectory(prefix="tilechain-bench-") as tmp:
        stack = Stack({c: f"127.0.0.1:{free_port()}" for c in COMPONENTS}, Path(tmp) / "logs")
        stack.start(components=COMPONENTS, extra_env={"TILECHAIN_OUTPUT_ROOT": str(Path(tmp) / "outputs")})
        try:
            gw = GatewayRun(stack, png)
            gw_pid = gw.pids["gateway"]
            rss_idle = proc_status(gw_pid)
            print(f"stack up ({', '.join(COMPONENTS)}); gateway pid {gw_pid}, RSS {rss_idle['VmRSS'] / 1024:.0f} MiB", flush=True)

            # warm-up: channels, imports and allocator pools on both sides
            gw.run(gateway_pb2.TILE_RETURN_NONE)
            inprocess.run()
            counts = transport_counts(inprocess)

            gw_runs, ip_runs, ip_compute = [], [], []
            for i in range(args.repeats):
                r = gw.run(gateway_pb2.TILE_RETURN_NONE)
                gw_runs.append(r)
                wall, cpu = inprocess.run()
                ip_runs.append((wall, cpu))
                ip_compute.append(dict(inprocess.compute))
                print(f"  run {i + 1}: gateway {r['wall']:.2f} s, in-process {wall:.2f} s", flush=True)
            rss_after_none = proc_status(gw_pid)

            final_run = gw.run(gateway_pb2.TILE_RETURN_FINAL)
            identical = final_run["final"] is not None and np.array_equal(final_run["final"], inprocess.final)
            rss_after_final = proc_status(gw_pid)
            all_run = gw.run(gateway_pb2.TILE_RETURN_ALL)
            rss_after_all = proc_status(gw_pid)
            services_hwm = {c: proc_status(gw.pids[c])["VmHWM"] for c in COMPONENTS}
        finally:
            stack.stop()

    # the ALL run's tile events are the stages' outputs as the gateway saw them: check the plan counts
    stages = [s["name"] for s in CHAIN["stages"]]
    events_match = all(all_run["tiles"].get(n, 0) == counts["per_stage_tiles"][n] for n in stages) and all(
        all_run["bytes"].get(n, 0) == counts["per_stage_bytes"][n] for n in stages
    )

    echo = echo_bench(counts["in_tiles"], counts["tile_bytes"], max(3, args.repeats))

    # --- numbers
    gw_wall = med(r["wall"] for r in gw_runs)
    ip_wall = med(w for w, _ in ip_runs)
    ip_cpu = med(c for _, c in ip_runs)
    gw_cpu = {k: med(r["cpu"][k] for r in gw_runs) for k in gw_runs[0]["cpu"]}
    compute = {n: med(c[n] for c in ip_compute) for n in stages}
    in_tps = counts["in_tiles"] / gw_wall
    out_tps = counts["out_tiles"] / gw_wall
    in_mbps = counts["in_bytes"] / gw_wall / MB
    out_mbps = counts["out_bytes"] / gw_wall / MB
    raw, tile = echo["raw"], echo["tile"]
    # lower bound of transport time in the chain if the gateway moved its tiles at raw-echo speed
    echo_time_for_chain = (counts["in_bytes"] + counts["out_bytes"]) / 2 / (raw["mb_per_s"] * MB)

    res = {
        "info": info, "counts": counts, "gw_wall": gw_wall, "ip_wall": ip_wall, "ratio": gw_wall / ip_wall,
        "gw_walls": [r["wall"] for r in gw_runs], "ip_walls": [w for w, _ in ip_runs], "ip_cpu": ip_cpu,
        "gw_cpu": gw_cpu, "compute": compute, "in_tps": in_tps, "out_tps": out_tps, "in_mbps": in_mbps,
        "out_mbps": out_mbps, "echo": echo, "echo_time_for_chain": echo_time_for_chain,
        "rss_idle": rss_idle, "rss_after_none": rss_after_none, "rss_after_final": rss_after_final,
        "rss_after_all": rss_after_all, "services_hwm": services_hwm,
        "final_wall": final_run["wall"], "all_wall": all_run["wall"], "all_tiles": sum(all_run["tiles"].values()),
        "all_bytes": sum(all_run["bytes"].values()), "identical": identical, "events_match": events_match,
        "png_bytes": len(png), "repeats": args.repeats, "elapsed": time.perf_counter() - began,
    }
    text = report(res)
    print()
    print(text)
    if not args.no_write:
        write_results(res, text)
        print(f"\nwrote {RESULTS.relative_to(ROOT)}")
    if not identical:
        print("ERROR: the gateway's final image differs from the in-process one", file=sys.stderr)
        return 1
    if not events_match:
        print("ERROR: tile events of the TILE_RETURN_ALL run do not match the planned transport tiles", file=sys.stderr)
        return 1
    return 0


def report(r: dict) -> str:
    c, e = r["counts"], r["echo"]
    raw, tile = e["raw"], e["tile"]
    stages = " -> ".join(
        s["type"] + (f"({', '.join(f'{k}={v}' for k, v in s.get('params', {}).items())})" if s.get("params") else "")
        for s in CHAIN["stages"]
    )
    mib = lambda kb: f"{kb / 1024:.0f} MiB"  # noqa: E731
    lines = [
        f"chain: {stages}",
        f"  input: attached {SOURCE_EDGE}x{SOURCE_EDGE} RGB PNG ({r['png_bytes'] / MB:.1f} MB); canvases 1024^2 -> 4096^2 -> 3072^2 -> 1024^2 RGB;",
        f"  transport tile {TRANSPORT_TILE}x{TRANSPORT_TILE}x3 = {c['tile_bytes']:,} B; median of {r['repeats']} runs after one warm-up; MB = 10^6 B",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| gateway chain wall time (TILE_RETURN_NONE) | **{r['gw_wall']:.2f} s** (runs: {fmt_s(r['gw_walls'])}) |",
        f"| same stages in-process, same TileEngine, no gRPC | **{r['ip_wall']:.2f} s** (runs: {fmt_s(r['ip_walls'])}) |",
        f"| ratio gateway / in-process | **{r['ratio']:.2f}x** |",
        f"| gateway chain, TILE_RETURN_FINAL / TILE_RETURN_ALL (1 run each) | {r['final_wall']:.2f} s / {r['all_wall']:.2f} s |",
        f"| tiles through the gateway, per chain | in (stage -> gateway): {c['in_tiles']} tiles, {c['in_bytes'] / MB:.1f} MB; "
        f"out (gateway -> stage): {c['out_tiles']} tiles, {c['out_bytes'] / MB:.1f} MB |",
        f"| gateway throughput during the chain | **{r['in_tps']:.1f} tiles/s, {r['in_mbps']:.1f} MB/s in**; "
        f"{r['out_tps']:.1f} tiles/s, {r['out_mbps']:.1f} MB/s out |",
        f"| raw gRPC echo, bytes ({raw['messages']} x {c['tile_bytes']:,} B each way) | **{raw['msgs_per_s']:.1f} msgs/s, {raw['mb_per_s']:.1f} MB/s** "
        f"(each way; {raw['wall']:.3f} s) |",
        f"| gRPC echo, StageInput -> StageOutput protobuf tiles | {tile['msgs_per_s']:.1f} msgs/s, {tile['mb_per_s']:.1f} MB/s (each way; {tile['wall']:.3f} s) |",
        f"| gateway throughput / raw echo | {r['in_mbps'] / raw['mb_per_s'] * 100:.1f}% (in) |",
        f"| gateway RSS before the runs | {mib(r['rss_idle']['VmRSS'])} |",
        f"| gateway peak RSS (VmHWM) after warm-up + {r['repeats']} NONE runs | **{mib(r['rss_after_none']['VmHWM'])}** (RSS now {mib(r['rss_after_none']['VmRSS'])}) |",
        f"| gateway peak RSS after the FINAL run / after the ALL run | {mib(r['rss_after_final']['VmHWM'])} / {mib(r['rss_after_all']['VmHWM'])} |",
        "",
        "where the time goes (medians of the NONE runs):",
        "",
        "| | seconds |",
        "| --- | --- |",
    ]
    for name, seconds in r["compute"].items():
        lines.append(f"| stage code `{name}` (in-process, TileEngine._compute) | {seconds:.2f} |")
    lines.append(f"| stage code, all stages | {sum(r['compute'].values()):.2f} |")
    lines.append(f"| in-process run, CPU (all threads) | {r['ip_cpu']:.2f} |")
    for comp, seconds in r["gw_cpu"].items():
        label = "bench client (RunChain caller)" if comp == "client" else f"{comp} process"
        lines.append(f"| gateway run, CPU of {label} | {seconds:.2f} |")
    lines.append(f"| gateway run, CPU of all processes | {sum(r['gw_cpu'].values()):.2f} |")
    lines.append(f"| raw echo of the chain's bytes (in+out)/2 at raw-echo MB/s | {r['echo_time_for_chain']:.2f} |")
    lines.append(
        f"| echo server CPU per run, raw / protobuf tile | {raw['server_cpu']:.2f} / {tile['server_cpu']:.2f} |"
    )
    lines += [
        "",
        f"peak RSS (VmHWM) of each process at the end: "
        + ", ".join(f"{k} {v / 1024:.0f} MiB" for k, v in r["services_hwm"].items()),
        f"checks: gateway final image == in-process final image: {r['identical']}; "
        f"TILE_RETURN_ALL tile events ({r['all_tiles']} tiles, {r['all_bytes'] / MB:.1f} MB) == planned stage outputs: {r['events_match']}",
        f"bench wall time: {r['elapsed']:.0f} s",
    ]
    return "\n".join(lines)


def write_results(r: dict, text: str) -> None:
    i = r["info"]
    block = "\n".join(
        [
            BEGIN,
            "<!-- written by `make bench` (bench/bench_chain.py); the text outside the markers is by hand -->",
            "",
            "## Last run",
            "",
            f"- machine: {i['cpu']}, {i['cores']} cores, {i['ram']} RAM, {i['os']}, no GPU used",
            f"- Python {i['python']}; {i['libs']}",
            f"- date: {i['date']}",
            "- command: `make bench` (= `python bench/bench_chain.py`)",
            "",
            "```",
            *[line for line in text.splitlines() if not line.startswith("|") and line.strip() and not line.startswith("where")][:3],
            "```",
            "",
            *[line for line in text.splitlines()[4:]],
            "",
            END,
        ]
    )
    if RESULTS.exists():
        current = RESULTS.read_text()
        if BEGIN in current and END in current:
            head, rest = current.split(BEGIN, 1)
            tail = rest.split(END, 1)[1]
            RESULTS.write_text(head + block + tail)
            return
        RESULTS.write_text(current.rstrip() + "\n\n" + block + "\n")
        return
    RESULTS.write_text("# Benchmark: a 4096x4096 chain through the gateway\n\n" + block + "\n")


if __name__ == "__main__":
    sys.exit(main())
