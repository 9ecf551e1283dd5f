"""`make bench`, part 2: super-resolution x4 of a 2048x2048 RGB image with the ESRGAN model
`esrgan-x4` (models.yaml), through the gateway and the real stage services, against the same
model called directly with spandrel in one process over the same tiles.

Prints, and records in bench/RESULTS.md (between the bench-upscale:begin/end markers; the rest
of that file is written by hand or by bench/bench_chain.py):
  * the gateway's wall time for `source-image -> upscale-resrgan(model=esrgan-x4, tile=512,
    overlap=32)` with TILE_RETURN_FINAL (the client receives every output tile), request sent ->
    final status received, against a direct spandrel run over the same processing tiles (same
    512 px input tiles, 32 px context, feathered blending), and their ratio;
  * when the first output tile reaches the client, as a share of the whole job;
  * processing and transport tiles per second, where the CPU goes in each process (the upscale
    service split by thread), peak RSS, a near-free stage over the same transport for scale;
  * whether the gateway's image equals the direct one, and (with --untiled) one untiled call.

The model is a tiny random-weight ESRGAN (num_filters=16, num_blocks=1) built by `make models`,
run on the CPU; on a GPU a full-size one would be used. 2048² x4 on two CPU cores takes minutes
per run, so the default is one interleaved gateway/direct pair (--repeats for more).

Run: python bench/bench_upscale.py [--repeats N] [--untiled] [--size PX] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_chain import TICK, results_block, write_section, cpu_seconds, free_port, machine, med, mib, process_memory, reset_peak, secs, self_cpu  # noqa: E402

from tilechain.client import TileAssembler, chain_request, connect  # noqa: E402
from tilechain.services.core.codecs import decode_image, encode_image  # noqa: E402
from tilechain.services.core.tiles import feather_weights, plan_windows  # noqa: E402
from tilechain.stack import Stack  # noqa: E402
from tilechain.v1 import gateway_pb2  # noqa: E402

ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"
BEGIN, END = "<!-- bench-upscale:begin -->", "<!-- bench-upscale:end -->"
HEADING = "# Benchmark: super-resolution x4 through the gateway"

MODEL = "esrgan-x4"
MODEL_FILE = ROOT / "var" / "models" / "upscalers" / "esrgan-x4.safetensors"
TILE, OVERLAP = 512, 32          # the stage's params: input px per processing tile, input px of context
TRANSPORT_TILE = 512             # the default transport tile edge
WARMUP_EDGE = 256                # a small image through both paths first: loads the model, warms torch
COMPONENTS = ("source", "upscale", "gateway")
MB = 1e6


def make_image(edge: int, rng: np.random.Generator) -> np.ndarray:
    """A photo-like RGB test image: a bicubic-smoothed random colour field plus +-4 of noise.
    Not pure noise because its PNG must stay under 8 MiB: the gateway refuses larger requests
    (services/core/server.py and tilechain/client.py put gRPC's 8 MiB limit before the 256 MiB
    GATEWAY_MAX_REQUEST_BYTES override, and gRPC keeps the first of two equal keys); a random
    2048² PNG is 12.6 MB. The model's cost does not depend on the content."""
    from PIL import Image

    field = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize((edge, edge), Image.BICUBIC)
    return np.clip(np.asarray(field).astype(np.int16) + rng.integers(-4, 5, (edge, edge, 3)), 0, 255).astype(np.uint8)


def upscale_chain(stage_type: str = "upscale-resrgan", params: dict | None = None) -> dict:
    if params is None:
        params = {"model": MODEL, "tile": TILE, "overlap": OVERLAP}
    return {"stages": [{"name": "load", "type": "source-image"}, {"name": "up", "type": stage_type, "params": params}]}


# --- process facts --------------------------------------------------------------------------

def thread_cpu(pid: int) -> dict[int, tuple[str, float, int]]:
    """Every thread of a process: tid -> (comm, CPU seconds (user + system), involuntary
    context switches, i.e. times it was preempted while runnable)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            status = (task / "status").read_text()
        except OSError:
            continue  # the thread ended
        preempted = int(re.search(r"nonvoluntary_ctxt_switches:\s+(\d+)", status).group(1))
        out[int(task.name)] = (comm, (int(fields[11]) + int(fields[12])) / TICK, preempted)
    return out


def thread_groups(pid: int, before: dict, after: dict) -> dict[str, float]:
    """CPU seconds used between two thread_cpu snapshots of a stage service, by kind of thread:
    main = the asyncio loop (gRPC messages in and out, the engine's input buffering, blending
    and transport-tile cutting); compute = the other Python-created threads (the to_thread
    worker that runs the stage code, and torch's intra-op pool, which it starts);
    grpc = gRPC core's own threads (event_engine, grpc_global_timer, ...); and
    compute_preempted = the compute threads' involuntary context switches. Threads that ended
    during the run are missing from `after`; their CPU is lost (rare: pools keep theirs)."""
    groups = {"main": 0.0, "compute": 0.0, "grpc": 0.0, "compute_preempted": 0}
    for tid, (comm, cpu, preempted) in after.items():
        _, cpu0, preempted0 = before.get(tid, (comm, 0.0, 0))
        kind = "main" if tid == pid else "compute" if comm.startswith("python") else "grpc"
        groups[kind] += cpu - cpu0
        if kind == "compute":
            groups["compute_preempted"] += preempted - preempted0
    return groups


def proc_times(pid: int) -> dict[str, float]:
    """User and system CPU seconds and minor page faults of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return {"user": int(fields[11]) / TICK, "sys": int(fields[12]) / TICK, "minflt": int(fields[7])}


def self_hwm_reset() -> bool:
    return reset_peak(os.getpid())


def load1() -> float:
    return os.getloadavg()[0]


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (all cores, every process), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / TICK


# --- direct: spandrel in this process ---------------------------------------------------------

class Direct:
    """The model called by spandrel in this process, over the same processing tiles as the
    stage: output windows of TILE*scale px overlapping by OVERLAP*scale, each computed from its
    input rect (window / scale) plus OVERLAP px of context, blended with linear feather weights
    over the overlap. Written out with numpy and torch here, not with tilechain's engine."""

    def __init__(self, tile: int = TILE, context: int = OVERLAP) -> None:
        import spandrel
        import torch

        self.torch = torch
        self.model = spandrel.ModelLoader(torch.device("cpu")).load_from_file(MODEL_FILE).eval()
        self.tile, self.context = tile, context
        self.scale = self.model.scale

    def _forward(self, pixels: np.ndarray) -> np.ndarray:
        torch = self.torch
        pixels = np.ascontiguousarray(pixels)
        if not pixels.flags.writeable:  # a decoded PNG is read-only; torch wants writable memory
            pixels = pixels.copy()
        x = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).to(torch.float32) / 255.0
        y = self.model(x)  # spandrel: inference mode, pads to the size requirements, clamps
        return y.squeeze(0).permute(1, 2, 0).clamp(0, 1).mul(255).round().byte().numpy()

    def run(self, png: bytes) -> dict:
        """One tiled run: decode the PNG, every processing tile through the model, blend."""
        self_hwm_reset()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        busy0, cpu0, t0 = machine_busy(), self_cpu(), time.perf_counter()
        pixels = decode_image(png)
        h, w, _ = pixels.shape
        s, ov = self.scale, self.context * self.scale
        out_h, out_w, tile_out = h * s, w * s, self.tile * s
        acc = np.zeros((out_h, out_w, 3), dtype=np.float32)
        weight = np.zeros((out_h, out_w), dtype=np.float32)
        forward_s = forward_cpu = blend_s = 0.0
        tile_walls = []
        input_px = 0
        # the stage's own tile geometry and feather weights (tilechain's core), the model calls
        # and the blending written out here
        for window in plan_windows(out_w, out_h, tile_out, ov):
            wy, wx, wh, ww = window.y, window.x, window.height, window.width
            # the input under the window, plus context, clamped to the image
            iy, ix = max(0, wy // s - self.context), max(0, wx // s - self.context)
            iy1, ix1 = min(h, -(-(wy + wh) // s) + self.context), min(w, -(-(wx + ww) // s) + self.context)
            tw, tc = time.perf_counter(), self_cpu()
            up = self._forward(pixels[iy:iy1, ix:ix1])
            forward_s += time.perf_counter() - tw
            forward_cpu += self_cpu() - tc
            tile_walls.append(time.perf_counter() - tw)
            input_px += (iy1 - iy) * (ix1 - ix)
            tb = time.perf_counter()
            result = up[wy - iy * s : wy - iy * s + wh, wx - ix * s : wx - ix * s + ww]
            fw = feather_weights(window, out_w, out_h, ov)
            acc[wy : wy + wh, wx : wx + ww] += result * fw[:, :, None]
            weight[wy : wy + wh, wx : wx + ww] += fw
            blend_s += time.perf_counter() - tb
        tb = time.perf_counter()
        image = np.empty((out_h, out_w, 3), dtype=np.uint8)
        for y in range(0, out_h, TRANSPORT_TILE):  # in bands: no second full-size float array
            band = acc[y : y + TRANSPORT_TILE] / weight[y : y + TRANSPORT_TILE, :, None]
            image[y : y + TRANSPORT_TILE] = np.clip(np.rint(band), 0, 255).astype(np.uint8)
        blend_s += time.perf_counter() - tb
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = self_cpu() - cpu0
        return {
            "wall": wall, "cpu": cpu, "others": max(0.0, machine_busy() - busy0 - cpu), "sys": r1.ru_stime - r0.ru_stime, "minflt": r1.ru_minflt - r0.ru_minflt, "preempted": r1.ru_nivcsw - r0.ru_nivcsw, "forward": forward_s, "forward_cpu": forward_cpu, "blend": blend_s,
            "tiles": len(tile_walls), "tile_walls": tile_walls, "input_px": input_px, "image": image,
            "hwm": process_memory(os.getpid())["VmHWM"],
        }

    def untiled(self, png: bytes) -> dict:
        """The whole image in one model call."""
        self_hwm_reset()
        before = process_memory(os.getpid())["VmRSS"]
        cpu0, t0 = self_cpu(), time.perf_counter()
        image = self._forward(decode_image(png))
        return {"wall": time.perf_counter() - t0, "cpu": self_cpu() - cpu0, "image": image,
                "rise": process_memory(os.getpid())["VmHWM"] - before}


PROBE_EDGE = TILE + 2 * OVERLAP  # an interior processing tile's input: 576²
# big tensors from the heap, not fresh mmaps, and freed memory kept for the next call
MALLOC_HEAP = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(4 << 30)}


def probe() -> dict:
    """One model call on an interior tile's input (576² -> 2304²) after a warm-up call, in this
    (fresh) process: wall, user and system CPU, minor page faults (the faster of two calls), and
    the process's peak RSS."""
    direct = Direct()
    pixels = np.random.default_rng(5).integers(0, 256, (PROBE_EDGE, PROBE_EDGE, 3), dtype=np.uint8)
    direct._forward(pixels)
    runs = []
    for _ in range(2):  # the faster of two
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        direct._forward(pixels)
        wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        runs.append({"wall": wall, "user": r1.ru_utime - r0.ru_utime, "sys": r1.ru_stime - r0.ru_stime,
                     "minflt": r1.ru_minflt - r0.ru_minflt, "hwm": process_memory(os.getpid())["VmHWM"]})
    return min(runs, key=lambda r: r["wall"])


def probe_both() -> dict[str, dict]:
    """probe() in a fresh interpreter with glibc's malloc defaults and with MALLOC_HEAP."""
    out = {}
    for key, extra in (("default", {}), ("heap", MALLOC_HEAP)):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env.update(extra)
        text = subprocess.run([sys.executable, __file__, "--probe"], env=env, capture_output=True, text=True, check=True).stdout
        out[key] = json.loads(text.strip().splitlines()[-1])
    return out


# --- through the gateway ----------------------------------------------------------------------

class Gateway:
    def __init__(self, stack: Stack, png: bytes) -> None:
        self.stub = connect(stack.addresses["gateway"])
        self.png = png
        self.pids = {c: stack.processes[c].pid for c in COMPONENTS}

    def run(self, chain: dict) -> dict:
        """One RunChain with TILE_RETURN_FINAL, timed from sending the request to receiving the
        final status; the output tiles are assembled into the image as they arrive."""
        request = chain_request(chain, [("load", "image", self.png)], return_tiles=gateway_pb2.TILE_RETURN_FINAL)
        up = self.pids["upscale"]
        peaks = {c: reset_peak(p) for c, p in self.pids.items()}
        cpu0 = {c: cpu_seconds(p) for c, p in self.pids.items()}
        threads0, times0 = thread_cpu(up), proc_times(up)
        client0 = self_cpu()
        assembler = TileAssembler()
        first_tile = None
        progress: list[float] = []       # client arrival times of the upscale stage's tile progress
        tiles = tile_bytes = 0
        status = None
        busy0, t0 = machine_busy(), time.perf_counter()
        for event in self.stub.RunChain(request, timeout=1800):
            kind = event.WhichOneof("kind")
            if kind == "tile":
                if first_tile is None:
                    first_tile = time.perf_counter() - t0
                tiles += 1
                tile_bytes += len(event.tile.tile.pixels)
                assembler.add(event.tile)
            elif kind == "progress" and event.progress.name == "up" and event.progress.progress.unit == "tiles":
                progress.append(time.perf_counter() - t0)
            elif kind == "status":
                status = event.status
        wall = time.perf_counter() - t0
        if status is None or status.state != gateway_pb2.JOB_STATE_SUCCEEDED:
            raise RuntimeError(f"the gateway chain did not succeed: {status}")
        cpu = {c: cpu_seconds(p) - cpu0[c] for c, p in self.pids.items()}
        cpu["client"] = self_cpu() - client0
        times = {k: v - times0[k] for k, v in proc_times(up).items()}
        others = max(0.0, machine_busy() - busy0 - sum(cpu.values()))
        hwm = {c: process_memory(p)["VmHWM"] if peaks[c] else None for c, p in self.pids.items()}
        return {
            "wall": wall, "others": others, "first_tile": first_tile, "progress": progress, "tiles": tiles, "bytes": tile_bytes,
            "cpu": cpu, "up_sys": times["sys"], "up_minflt": times["minflt"], "up_threads": thread_groups(up, threads0, thread_cpu(up)), "hwm": hwm,
            "image": assembler.images.get(("up", 0)),
        }


# --- report ---------------------------------------------------------------------------------

def compare(a: np.ndarray | None, b: np.ndarray) -> dict:
    if a is None or a.shape != b.shape:
        return {"equal": False, "max": None, "within2": 0.0, "shape": None if a is None else a.shape}
    if np.array_equal(a, b):
        return {"equal": True, "max": 0, "within2": 1.0}
    worst, close = 0, 0
    for y in range(0, a.shape[0], 512):  # in bands: int16 copies of 8192² images are large
        diff = np.abs(a[y : y + 512].astype(np.int16) - b[y : y + 512].astype(np.int16)).max(axis=2)
        worst = max(worst, int(diff.max()))
        close += int((diff <= 2).sum())
    return {"equal": False, "max": worst, "within2": close / (a.shape[0] * a.shape[1])}


def describe_compare(c: dict) -> str:
    if c["equal"]:
        return "identical (every byte equal)"
    if c["max"] is None:
        return f"not comparable (gateway image {c.get('shape')})"
    return f"not identical: max abs difference {c['max']}/255, {c['within2'] * 100:.3f}% of pixels within 2/255"


def describe(chain: dict) -> str:
    parts = []
    for s in chain["stages"]:
        params = ", ".join(f"{k}={v}" for k, v in s.get("params", {}).items())
        parts.append(f"{s['type']}({params})" if params else s["type"])
    return " -> ".join(parts)


def report(r: dict) -> list[str]:
    gw, dr, ref = r["gw"], r["direct"], r["ref"]
    size, out = r["size"], r["size"] * 4
    gw_wall, dr_wall = med(x["wall"] for x in gw), med(x["wall"] for x in dr)
    first = med(x["first_tile"] for x in gw)
    share = med(x["first_tile"] / x["wall"] for x in gw)
    n_proc, n_transport = dr[0]["tiles"], gw[0]["tiles"]
    cpu = {k: med(x["cpu"][k] for x in gw) for k in gw[0]["cpu"]}
    threads = {k: med(x["up_threads"][k] for x in gw) for k in gw[0]["up_threads"]}
    forward, forward_cpu, blend = med(x["forward"] for x in dr), med(x["forward_cpu"] for x in dr), med(x["blend"] for x in dr)
    dr_cpu = med(x["cpu"] for x in dr)
    rest = med(x["wall"] - x["forward"] - x["blend"] for x in dr)
    gaps = [b - a for x in gw for a, b in zip(x["progress"], x["progress"][1:])]
    tile_walls = [t for x in dr for t in x["tile_walls"]]
    ref_wall = med(x["wall"] for x in ref)
    up_hwm = max((x["hwm"]["upscale"] for x in gw if x["hwm"]["upscale"]), default=None)
    gw_hwm = max((x["hwm"]["gateway"] for x in gw if x["hwm"]["gateway"]), default=None)
    loads = r["loads"]
    up_sys, up_flt = med(x["up_sys"] for x in gw), med(x["up_minflt"] for x in gw)
    dr_sys, dr_flt = med(x["sys"] for x in dr), med(x["minflt"] for x in dr)
    pd, ph = r["probes"]["default"], r["probes"]["heap"]
    pair_ratios = ", ".join(f"{g['wall'] / d['wall']:.3f}" for g, d in zip(gw, dr))
    first_runs = ", ".join(f"{x['first_tile']:.1f} s / {x['first_tile'] / x['wall'] * 100:.1f}%" for x in gw)
    cores = os.cpu_count() or 1
    others = [x["others"] / (cores * x["wall"]) for x in gw + dr]  # share of the machine's capacity
    busy = max(others) > 0.10
    behind = "longer" if gw_wall >= dr_wall else "shorter"
    lines = [
        f"Chain: `{describe(r['chain'])}` through the Gateway RunChain RPC with TILE_RETURN_FINAL (the last stage's "
        f"output tiles stream back to the caller), from an attached {size}x{size} RGB PNG ({r['png_bytes'] / MB:.1f} MB; a smoothed random colour field plus ±4 noise, "
        "not pure noise, which would exceed the gateway's effective 8 MiB request limit); "
        f"output {out}x{out} RGB8 = {out * out * 3 / MB:.0f} MB in {n_transport} transport tiles of {TRANSPORT_TILE}². "
        f"Model: `{MODEL}` ({MODEL_FILE.relative_to(ROOT)}), spandrel {r['arch']}, a tiny random-weight ESRGAN "
        f"(num_filters=16, num_blocks=1), fp32 on the CPU with {r['threads']} torch threads: this machine has no GPU, where "
        "a full-size model (num_filters=64, num_blocks=23) would run. "
        f"Processing tiles: {n_proc} of {TILE * 4}² output px ({TILE} input px + {OVERLAP} px context, "
        f"{OVERLAP * 4} output px feathered overlap), {dr[0]['input_px'] / 1e6:.2f} Mpx of model input per run "
        f"({dr[0]['input_px'] / (size * size):.2f}x the image).",
        "",
        f"Direct: the same model file loaded with spandrel's ModelLoader in the bench process and called on the same "
        f"{n_proc} input tiles with the same context and feathered blending (numpy + torch, written out in the bench, "
        "not tilechain's engine), from the same PNG (decoding timed). "
        f"Runs interleaved gateway, direct, ... after one {WARMUP_EDGE}² warm-up through each (model loaded, torch warm); "
        f"{len(gw)} run(s) each{' — full 2048² runs take minutes each on this CPU, so fewer repetitions' if size >= 2048 and len(gw) < 3 else ''}; "
        "medians, MB = 10^6 B.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| **gateway wall time** (RunChain request → final status, output tiles received) | **{gw_wall:.1f} s** (runs {secs(x['wall'] for x in gw)}) |",
        f"| **direct spandrel, same tiles, one process** | **{dr_wall:.1f} s** (runs {secs(x['wall'] for x in dr)}) |",
        f"| **ratio gateway / direct** (goal ≤ 1.10) | **{gw_wall / dr_wall:.3f}x** (per pair {pair_ratios}) |",
        f"| **first output tile at the client** (goal ≤ 15% of the job) | **{first:.1f} s = {share * 100:.1f}%** of the job "
        f"(runs {first_runs}) |",
        f"| throughput, gateway | {n_proc / gw_wall:.3f} processing tiles/s, {n_transport / gw_wall:.2f} output transport tiles/s "
        f"({gw[0]['bytes'] / gw_wall / MB:.2f} MB/s to the client), {size * size / gw_wall / 1e6:.3f} input Mpx/s |",
        f"| throughput, direct | {n_proc / dr_wall:.3f} processing tiles/s, {size * size / dr_wall / 1e6:.3f} input Mpx/s |",
        f"| direct: model calls (to tensor, forward, to uint8) / blending / the rest | {forward:.1f} s / {blend:.1f} s / "
        f"{rest:.1f} s wall; one model call {min(tile_walls):.2f}–{max(tile_walls):.2f} s (median {med(tile_walls):.2f}) |",
        f"| gateway: time between the upscale stage's successive tile-progress events, at the client | "
        f"median {med(gaps):.2f} s, {min(gaps):.2f}–{max(gaps):.2f} s |" if gaps else "| gateway: progress events | none seen |",
    ]
    if r["untiled"] is not None:
        u = r["untiled"]
        lines.append(
            f"| direct, untiled: the whole {size}² image in one model call | {u['wall']:.1f} s, {u['cpu']:.1f} CPU-s, "
            f"peak RSS +{mib(u['rise'])}; vs the tiled result: {describe_compare(u['vs_tiled'])} |"
        )
    else:
        lines.append(
            f"| direct, untiled (one call on the whole {size}²) | {r['untiled_skipped'] or 'not run (pass --untiled)'}; it needs ~{r['untiled_est_gib']:.0f} GiB, "
            f"extrapolated from a 1024² call, and ~{r['untiled_est_s']:.0f} s at the tiled runs' time per input pixel) |"
        )
    lines += [
        f"| near-free stage, same transport: `source-image -> upscale-simple(scale=4, method=nearest)`, TILE_RETURN_FINAL | "
        f"{ref_wall:.2f} s (runs {secs(x['wall'] for x in ref)}) |",
        f"| peak RSS (VmHWM, reset before each run): upscale service / gateway / direct (bench process) | "
        f"{mib(up_hwm) if up_hwm else '?'} / {mib(gw_hwm) if gw_hwm else '?'} / {mib(max(x['hwm'] for x in dr))} |",
        "",
        f"Kernel time: the gateway run's upscale service spent {up_sys:.1f} of its {cpu['upscale']:.1f} CPU-s in the kernel "
        f"({up_flt / 1e6:.1f} M minor page faults), the direct run {dr_sys:.1f} of {dr_cpu:.1f} CPU-s ({dr_flt / 1e6:.1f} M faults). "
        f"One model call on an interior tile's {PROBE_EDGE}² input, in a fresh process after a warm-up call: with glibc's malloc "
        f"defaults {pd['wall']:.2f} s wall, {pd['user']:.2f} s user + {pd['sys']:.2f} s sys CPU, {pd['minflt'] / 1e6:.2f} M minor faults; "
        f"with {' '.join(f'{k}={v}' for k, v in MALLOC_HEAP.items())} {ph['wall']:.2f} s wall, {ph['user']:.2f} s user + "
        f"{ph['sys']:.2f} s sys, {ph['minflt'] / 1e6:.2f} M faults, peak RSS {mib(pd['hwm'])} → {mib(ph['hwm'])} (each 4x-resolution activation is {PROBE_EDGE * 4}² x 16 ch x 4 B = "
        f"{(PROBE_EDGE * 4) ** 2 * 64 / 2**20:.0f} MiB, above glibc's largest dynamic mmap threshold of 32 MiB, so by default every "
        "one is a fresh mmap whose pages fault in, and is unmapped again when freed).",
        "",
        "Where the time goes (CPU seconds per run, medians; the upscale service split by thread):",
        "",
        "| | CPU s |",
        "| --- | --- |",
        f"| gateway run: upscale service, compute threads (stage code: to tensor, model, to uint8; torch's pool) | {threads['compute']:.1f} |",
        f"| gateway run: upscale service, main thread (asyncio loop: gRPC in/out, input buffering, blending, cutting tiles) | {threads['main']:.2f} |",
        f"| gateway run: upscale service, gRPC core threads | {threads['grpc']:.2f} |",
        f"| gateway run: source service | {cpu['source']:.2f} |",
        f"| gateway run: gateway process | {cpu['gateway']:.2f} |",
        f"| gateway run: bench client (RunChain caller, assembling the tiles) | {cpu['client']:.2f} |",
        f"| gateway run: all processes | {sum(cpu.values()):.1f} |",
        f"| direct run: model calls (thread CPU of the process during them) | {forward_cpu:.1f} |",
        f"| direct run: whole process | {dr_cpu:.1f} |",
        "",
        f"Preemptions (involuntary context switches) per run: the upscale service's compute threads {threads['compute_preempted']:,.0f} "
        f"in the gateway run, the whole bench process {med(x['preempted'] for x in dr):,.0f} in the direct run. Torch runs "
        f"{r['threads']} intra-op threads on {os.cpu_count()} cores in both, so in the gateway run every bit of pipeline work done "
        "while the model runs (the service's loop sending tiles, gRPC, the gateway, the client) takes a core from a model thread, "
        "and a parallel region waits for its slowest thread; the direct run does its blending between model calls.",
        "",
    ]
    overhead = gw_wall - dr_wall
    non_model = threads["main"] + threads["grpc"] + cpu["source"] + cpu["gateway"] + cpu["client"]
    lines += [
        f"Where the time goes: the model dominates both paths — {forward:.1f} s of the direct run's {dr_wall:.1f} s wall are model "
        f"calls ({forward / dr_wall * 100:.0f}%), and in the gateway run the upscale service's compute threads use "
        f"{threads['compute']:.1f} CPU-s against {forward_cpu:.1f} CPU-s for the direct model calls; of the model's CPU about "
        f"{up_sys / cpu['upscale'] * 100:.0f}% (service) and {dr_sys / dr_cpu * 100:.0f}% (direct) is the kernel serving page faults "
        "(see Kernel time above). Everything else in the gateway "
        f"run (the upscale service's loop and gRPC threads, source, gateway, client) uses {non_model:.1f} CPU-s, and the gateway run "
        f"is {abs(overhead):.1f} s ({abs(gw_wall / dr_wall - 1) * 100:.1f}%) {behind} than the direct one; the same transport with a near-free "
        f"stage takes {ref_wall:.2f} s end to end. The first output tile waits for the first processing tile "
        f"({TILE * 4}² output px, one model call of ~{med(tile_walls):.1f} s) plus start-up, hence {share * 100:.1f}% of the job.",
        "",
        f"Check: the gateway's {out}² image against the direct tiled one: {describe_compare(r['match'])}.",
        f"Bench wall time {r['elapsed']:.0f} s; 1-minute load average {r['load'][0]:.2f} at the start, {r['load'][1]:.2f} at the end, "
        f"{', '.join(f'{x:.2f}' for x in loads)} before each timed run (the bench itself keeps both cores busy: ~2 is its own load, "
        "and under `make bench` bench_chain.py's load is still decaying at the start). CPU used by processes other than the bench and "
        f"its stack during the timed runs (/proc/stat busy time minus ours): gateway runs {secs(x['others'] for x in gw)} s, "
        f"direct runs {secs(x['others'] for x in dr)} s, at most {max(others) * 100:.0f}% of the {cores} cores' capacity — "
        + ("**something else competed for the cores: treat the times, and the ratio above all, with care.**"
           if busy else "nothing else competed noticeably."),
    ]
    return lines


def write_results(r: dict, lines: list[str]) -> None:
    i = r["info"]
    block = results_block(BEGIN, END, "bench_upscale.py", i, r["gpu"],
                          f"Python {i['python']}, {i['libs']}, torch {r['torch']}, spandrel {r['spandrel']}", r["command"], lines)
    write_section(BEGIN, END, block, HEADING)


# --- main -----------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="interleaved gateway/direct pairs, median reported (default 1: a pair takes ~5.5 min on 2 CPU cores)")
    parser.add_argument("--untiled", action="store_true", help="also run the whole image through the model in one call (~12 GiB at 2048²)")
    parser.add_argument("--size", type=int, default=2048, help="edge of the input image (default 2048; smaller for a quick try)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # probe() alone, as JSON
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe()))
        return 0
    began = time.perf_counter()
    # the direct run allocates as the services do (they tune glibc's malloc at start)
    from tilechain.services.core.server import tune_malloc

    tune_malloc()

    def log(text: str) -> None:
        print(text, flush=True)

    import spandrel
    import torch

    if not MODEL_FILE.exists():
        print(f"{MODEL_FILE} is missing: run `make models` first", file=sys.stderr)
        return 2
    info = machine()
    load_start = load1()
    gpu = f"GPU: {torch.cuda.get_device_name(0)} (not used: the stack and the direct run use the CPU)" if torch.cuda.is_available() else "no GPU"
    log(f"machine: {info['cpu']}, {info['cores']} cores, {info['ram']}, {gpu}; load {load_start:.2f}; tilechain {info['rev']}")
    rng = np.random.default_rng(2048)
    png = encode_image(make_image(args.size, rng), "png")
    warm_png = encode_image(make_image(WARMUP_EDGE, rng), "png")
    direct = Direct()
    chain = upscale_chain()
    ref_chain = upscale_chain("upscale-simple", {"scale": 4, "method": "nearest"})
    gw_runs, dr_runs, ref_runs, loads = [], [], [], []

    with tempfile.TemporaryDirectory(prefix="tilechain-bench-upscale-") as tmp:
        stack = Stack({c: f"127.0.0.1:{free_port()}" for c in COMPONENTS}, Path(tmp) / "logs")
        env = {
            "TILECHAIN_OUTPUT_ROOT": str(Path(tmp) / "outputs"),
            "TILECHAIN_MAX_PIXELS": str(max(8192 * 8192, (args.size * 4) ** 2)),
            "TILECHAIN_MODELS_ROOT": str(ROOT / "var" / "models"),
            "TILECHAIN_MODELS_CONFIG": str(ROOT / "models.yaml"),
        }
        try:
            stack.start(components=COMPONENTS, extra_env=env)
            log(f"stack up ({', '.join(COMPONENTS)})")
            gw, warm_gw = Gateway(stack, png), Gateway(stack, warm_png)
            warm_gw.run(chain)
            direct.run(warm_png)
            for _ in range(2):  # the transport with near-free stage code, for scale
                ref_runs.append(gw.run(ref_chain))
                ref_runs[-1]["image"] = None
            log(f"warm-up done; near-free stage, same transport: {secs(x['wall'] for x in ref_runs)} s")
            for i in range(args.repeats):
                loads.append(load1())
                gw_runs.append(gw.run(chain))
                if i:
                    gw_runs[-1]["image"] = None  # keep the first for the check
                loads.append(load1())
                dr_runs.append(direct.run(png))
                if i:
                    dr_runs[-1]["image"] = None
                g, d = gw_runs[-1], dr_runs[-1]
                log(f"  pair {i + 1}/{args.repeats}: gateway {g['wall']:.1f} s (first tile {g['first_tile']:.1f} s), "
                    f"direct {d['wall']:.1f} s (model calls {d['forward']:.1f} s); ratio {g['wall'] / d['wall']:.3f}")
        finally:
            stack.stop()

    match = compare(gw_runs[0]["image"], dr_runs[0]["image"])
    gw_runs[0]["image"] = None
    per_px = med(x["forward"] / x["input_px"] for x in dr_runs)
    log("one model call on a 576² tile, glibc malloc defaults vs MALLOC_MMAP_THRESHOLD_ ...")
    probes = probe_both()
    untiled, untiled_skipped = None, None
    est_gib = 3.1 * (args.size / 1024) ** 2  # measured here: +3.1 GiB peak RSS for one 1024² call
    available = int(re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2**20
    if args.untiled and available < 1.5 * est_gib:
        untiled_skipped = f"skipped: only {available:.0f} GiB of memory available"
        log(f"untiled: {untiled_skipped}")
    elif args.untiled:
        tiled = dr_runs[0]["image"]
        dr_runs[0]["image"] = None
        log("untiled: one model call on the whole image ...")
        untiled = direct.untiled(png)
        untiled["vs_tiled"] = compare(untiled.pop("image"), tiled)
        log(f"  untiled {untiled['wall']:.1f} s, peak RSS +{mib(untiled['rise'])}")
    results = {
        "info": info, "gpu": gpu, "torch": torch.__version__, "spandrel": spandrel.__version__, "threads": torch.get_num_threads(),
        "arch": direct.model.architecture.name, "size": args.size, "png_bytes": len(png), "chain": chain,
        "gw": gw_runs, "direct": dr_runs, "ref": ref_runs, "untiled": untiled, "match": match, "probes": probes, "loads": loads,
        "untiled_est_s": per_px * args.size * args.size,
        "untiled_est_gib": est_gib, "untiled_skipped": untiled_skipped,
        "elapsed": time.perf_counter() - began, "load": (load_start, load1()),
        "command": f"`python bench/bench_upscale.py {' '.join(sys.argv[1:])}`" if sys.argv[1:] else "`make bench` (`python bench/bench_upscale.py`)",
    }
    lines = report(results)
    print()
    print("\n".join(lines))
    if not args.no_write:
        write_results(results, lines)
        print(f"\nwrote {RESULTS.relative_to(ROOT)}")
    if not match["equal"] and (match["max"] is None or match["within2"] < 0.999):
        print("ERROR: the gateway's image differs from the direct one: " + describe_compare(match), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
