"""`make bench`, part 4: what the services' malloc tuning (services/core/server.py tune_malloc)
buys end to end.

The chain source-image -> upscale-resrgan(model=esrgan-x4, tile=512, overlap=32) on a 1024²
image, through the gateway (TILE_RETURN_NONE; request sent -> final status), on two stacks:
the default (large blocks from the heap, TILECHAIN_MALLOC_MMAP_THRESHOLD=1 GiB) and glibc's own
behaviour (TILECHAIN_MALLOC_MMAP_THRESHOLD=0). One warm-up run per stack loads the model; then
--repeats runs each, alternating; medians. Also the upscale service's minor page faults and CPU
over the timed runs, and its peak RSS.

Records its section in bench/RESULTS.md between the bench-malloc:begin/end markers.

Run: python bench/bench_malloc.py [--edge N] [--repeats N] [--no-write]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_chain import machine, results_block, publish  # noqa: E402
from bench_diffusion import start_stack  # noqa: E402
from bench_upscale import make_image, upscale_chain  # noqa: E402

from tilechain.client import chain_request, connect  # noqa: E402
from tilechain.services.core.codecs import encode_image  # noqa: E402
from tilechain.v1 import gateway_pb2  # noqa: E402

BEGIN, END = "<!-- bench-malloc:begin -->", "<!-- bench-malloc:end -->"
MODES = {"tuned (default)": {}, "glibc default (TILECHAIN_MALLOC_MMAP_THRESHOLD=0)": {"TILECHAIN_MALLOC_MMAP_THRESHOLD": "0"}}


def run(stub, png: bytes) -> float:
    t0 = time.perf_counter()
    request = chain_request(upscale_chain(), [("load", "image", png)])
    final = [e for e in stub.RunChain(request, timeout=1800) if e.WhichOneof("kind") == "status"][-1]
    if final.status.state != gateway_pb2.JOB_STATE_SUCCEEDED:
        raise RuntimeError(final.status.message)
    return time.perf_counter() - t0


def proc_facts(pid: int) -> dict[str, float]:
    """Minor faults and CPU seconds (user, system) so far, and peak RSS in MiB."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    hwm = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM"))
    return {"minflt": int(fields[7]), "user": int(fields[11]) / tick, "sys": int(fields[12]) / tick, "hwm": hwm / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edge", type=int, default=1024, help="input image edge (default 1024)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per stack (default 2)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    png = encode_image(make_image(args.edge, np.random.default_rng(0)), "png")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="tilechain-bench-malloc-") as tmpdir:
        stacks = {mode: start_stack(Path(tmpdir), f"m{i}", extra, ("source", "upscale", "gateway")) for i, (mode, extra) in enumerate(MODES.items())}
        try:
            stubs = {mode: connect(stack.addresses["gateway"]) for mode, stack in stacks.items()}
            for mode, stub in stubs.items():
                run(stub, png)  # warm-up: loads the model
                results[mode] = {"walls": [], "before": proc_facts(stacks[mode].processes["upscale"].pid)}
            for i in range(args.repeats):
                for mode, stub in stubs.items():
                    results[mode]["walls"].append(run(stub, png))
                    print(f"run {i + 1}/{args.repeats} {mode}: {results[mode]['walls'][-1]:.2f} s", flush=True)
            for mode, stack in stacks.items():
                results[mode]["after"] = proc_facts(stack.processes["upscale"].pid)
        finally:
            for stack in stacks.values():
                stack.stop()

    tuned, plain = (results[m] for m in MODES)
    rows = []
    for mode, r in results.items():
        b, a = r["before"], r["after"]
        n = len(r["walls"])
        rows.append(
            f"| {mode} | **{statistics.median(r['walls']):.2f} s** (runs {', '.join(f'{w:.2f}' for w in r['walls'])}) | "
            f"{(a['user'] - b['user']) / n:.1f} + {(a['sys'] - b['sys']) / n:.1f} | {(a['minflt'] - b['minflt']) / n / 1e6:.2f} M | {a['hwm']:.0f} MiB |"
        )
    speedup = statistics.median(plain["walls"]) / statistics.median(tuned["walls"])
    lines = [
        f"`source-image -> upscale-resrgan(esrgan-x4, tile 512, overlap 32)` on a {args.edge}² image through the gateway; "
        "the upscale service's CPU (user + system s), minor page faults per run, and its peak RSS:",
        "",
        "| upscale service malloc | wall (median) | CPU s per run | faults per run | peak RSS |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"Speed-up of the tuned default: **{speedup:.2f}x**.",
    ]
    block = results_block(BEGIN, END, "bench_malloc.py", machine(), "no GPU", "",
                          f"`python bench/bench_malloc.py --edge {args.edge} --repeats {args.repeats}`", lines, "Malloc tuning in the services")
    publish(BEGIN, END, block, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
