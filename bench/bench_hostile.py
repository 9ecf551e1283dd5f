"""`make bench`, part 5: what hostile requests cost. For each of issue 11's hostile inputs, the
time from sending the request to its INVALID_ARGUMENT (median of 16, on a warm channel), and the
RSS and peak RSS (VmRSS, VmHWM) of the gateway and of the persist service before and after 16
of each. Then one accepted large attachment (a 4096² random-pixel PNG, 48 MB) through
source-image -> reduce-thumbnail: the gateway's peak RSS above its RSS before, with the
attachment in the request and streamed in chunks (SubmitChainStream). The stack runs with the
default limits (TILECHAIN_MAX_PIXELS 8192², TILECHAIN_MAX_DECODE_RATIO 4096).

Records its section in bench/RESULTS.md between the bench-hostile:begin/end markers.

Run: python bench/bench_hostile.py [--repeats N] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT)]

from bench_chain import free_port, machine, process_memory, reset_peak, results_block, publish  # noqa: E402

from tests.test_images import bomb_png  # noqa: E402  (the hostile PNG the tests send too)

from tilechain.client import chain_request, connect, submit_stream  # noqa: E402
from tilechain.services.core.codecs import encode_image  # noqa: E402
from tilechain.stack import Stack  # noqa: E402
from tilechain.v1 import gateway_pb2  # noqa: E402

BEGIN, END = "<!-- bench-hostile:begin -->", "<!-- bench-hostile:end -->"
COMPONENTS = ("source", "upscale", "reduce", "persist", "gateway")
NOISE = {"name": "noise", "type": "source-noise", "params": {"width": 32, "height": 32, "seed": 1}}


def save(filename: str) -> gateway_pb2.ChainRequest:
    return chain_request({"stages": [NOISE, {"name": "save", "type": "persist-disk", "params": {"filename": filename}}]})


def raw_scale(text: str) -> gateway_pb2.ChainRequest:
    return chain_request('{"stages": [%s, {"name": "up", "type": "upscale-simple", "params": {"scale": %s}}]}' % (json.dumps(NOISE), text))


def hostile() -> dict[str, gateway_pb2.ChainRequest]:
    bomb = bomb_png(8000)
    return {
        f"{len(bomb)}-byte 1-bit PNG claiming 8000x8000 (source-image)": chain_request(
            {"stages": [{"name": "load", "type": "source-image"}]}, [("load", "image", bomb)]),
        "filename `{index:>100000000}.png`": save("{index:>100000000}.png"),
        "`10**400` as a param (400 zeros in the JSON)": raw_scale("1" + "0" * 400),
        "params nested 1000 deep": raw_scale("[" * 1000 + "2" + "]" * 1000),
        "a 256-byte file name": save("a" * 252 + ".png"),
        "transport_tile 1": chain_request({"stages": [NOISE]}, transport_tile=1),
    }


def refuse(stub, request) -> float:
    t0 = time.perf_counter()
    try:
        list(stub.RunChain(request, timeout=60))
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
            raise RuntimeError(f"{error.code()}: {error.details()}") from None
        return time.perf_counter() - t0
    raise RuntimeError("the request was not refused")


def mib(kb: int) -> str:
    return f"{kb / 1024:.0f} MiB"


def delta(kb: int) -> str:
    return f"{kb / 1024:+.1f} MiB"


def big_attachment(stack: Stack, stub, png: bytes, streamed: bool) -> dict:
    """One accepted large attachment: the gateway's peak RSS above its RSS just before."""
    chain = {"stages": [{"name": "load", "type": "source-image"},
                        {"name": "small", "type": "reduce-thumbnail", "params": {"width": 256, "height": 256}}]}
    pid = stack.processes["gateway"].pid
    before = process_memory(pid)
    reset_peak(pid)
    t0 = time.perf_counter()
    if streamed:
        ref = submit_stream(stub, chain, [("load", "image", png)], timeout=300)
        final = list(stub.WatchJob(ref, timeout=300))[-1].status
    else:
        final = list(stub.RunChain(chain_request(chain, [("load", "image", png)]), timeout=300))[-1].status
    seconds = time.perf_counter() - t0
    if final.state != gateway_pb2.JOB_STATE_SUCCEEDED:
        raise RuntimeError(final.message)
    after = process_memory(pid)
    return {"seconds": seconds, "peak_above": after["VmHWM"] - before["VmRSS"], "kept": after["VmRSS"] - before["VmRSS"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=16, help="requests of each kind (default 16)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    info = machine()
    began = time.perf_counter()
    load_start = os.getloadavg()[0]
    cases = hostile()
    png = encode_image(np.random.default_rng(11).integers(0, 256, (4096, 4096, 3), dtype=np.uint8), "png")
    rows, big = [], {}
    with tempfile.TemporaryDirectory(prefix="tilechain-bench-hostile-") as tmp:
        stack = Stack({c: f"127.0.0.1:{free_port()}" for c in COMPONENTS}, Path(tmp) / "logs")
        stack.start(components=COMPONENTS, extra_env={"TILECHAIN_OUTPUT_ROOT": str(Path(tmp) / "outputs")})
        try:
            stub = connect(stack.addresses["gateway"])
            pids = {name: stack.processes[name].pid for name in ("gateway", "persist")}
            list(stub.RunChain(chain_request({"stages": [NOISE]}), timeout=60))  # warm: catalogs, imports
            for request in cases.values():
                refuse(stub, request)
            for name, request in cases.items():
                before = {p: process_memory(pid) for p, pid in pids.items()}
                times = [refuse(stub, request) for _ in range(args.repeats)]
                after = {p: process_memory(pid) for p, pid in pids.items()}
                rows.append((name, times, before, after))
                print(f"{name}: median {statistics.median(times) * 1000:.1f} ms, gateway RSS "
                      f"{delta(after['gateway']['VmRSS'] - before['gateway']['VmRSS'])}", flush=True)
            for streamed in (True, False):  # streamed first: its first run meets a gateway that never held the file
                big["streamed (SubmitChainStream)" if streamed else "in the request (RunChain)"] = [
                    big_attachment(stack, stub, png, streamed) for _ in range(2)]
        finally:
            stack.stop()

    lines = [
        f"Each hostile request {args.repeats} times, one after another, on one warm channel; time = request sent → "
        "INVALID_ARGUMENT received (client side, median, and the slowest). RSS and peak (VmHWM) of the gateway and "
        "the persist service just before the first and just after the last of each kind. On main (issue 11, same "
        "machine) the PNG cost the gateway +659 MiB, the template cost persist 860 MiB, 10**400 and deep params "
        "returned UNKNOWN, a 255-character name failed after the job had run, and transport_tile 1 ran 740x slower.",
        "",
        "| hostile request | refused in (median / max) | gateway RSS before → after | gateway peak before → after | persist RSS before → after |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, times, before, after in rows:
        g0, g1, p0, p1 = before["gateway"], after["gateway"], before["persist"], after["persist"]
        lines.append(
            f"| {name} | {statistics.median(times) * 1000:.1f} ms / {max(times) * 1000:.1f} ms | "
            f"{mib(g0['VmRSS'])} → {mib(g1['VmRSS'])} ({delta(g1['VmRSS'] - g0['VmRSS'])}) | "
            f"{mib(g0['VmHWM'])} → {mib(g1['VmHWM'])} | {mib(p0['VmRSS'])} → {mib(p1['VmRSS'])} ({delta(p1['VmRSS'] - p0['VmRSS'])}) |"
        )
    lines += [
        "",
        f"An accepted large attachment, a 4096² random-pixel PNG ({len(png) / 1e6:.0f} MB; 48 MiB decoded), through "
        "source-image → reduce-thumbnail(256): the gateway decodes it in row bands while its tiles stream to the "
        "stage. Peak RSS above the RSS before the job (VmHWM reset just before), two runs each, streamed first; "
        "the gateway's malloc keeps freed memory for reuse (TILECHAIN_MALLOC_MMAP_THRESHOLD), so a second run "
        "shows what a job adds to a gateway that has run one before:",
        "",
        "| attachment sent | job time (run 1, run 2) | gateway peak above its RSS before (run 1, run 2) | gateway RSS kept after the job (run 1, run 2) |",
        "| --- | --- | --- | --- |",
    ]
    for how, (r1, r2) in big.items():
        lines.append(f"| {how} | {r1['seconds']:.2f} s, {r2['seconds']:.2f} s | {delta(r1['peak_above'])}, {delta(r2['peak_above'])} | "
                     f"{delta(r1['kept'])}, {delta(r2['kept'])} |")
    lines += ["", f"Bench wall time {time.perf_counter() - began:.0f} s; 1-minute load average {load_start:.2f} at the start, "
              f"{os.getloadavg()[0]:.2f} at the end (the machine is shared: other work was running)."]
    block = results_block(BEGIN, END, "bench_hostile.py", info, "no GPU", "", "`make bench` (`python bench/bench_hostile.py`)",
                          lines, title="Hostile requests: refused early, at no memory cost")
    publish(BEGIN, END, block, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
