"""The gateway's own settings: its job store, how many jobs it runs, attempts and leases, and the
stream limits that admission keeps every family within. Each from an environment variable, the
store also from a flag; docs/jobs.md lists them with their defaults."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Callable

from tilechain.services.core.config import FAMILIES

from .store import default_store
from .store.base import JobStore

log = logging.getLogger("tilechain.gateway")

# Concurrent streams one replica of a family serves. The model families are sized for one GPU:
# the diffusion families (source, blend) run the calls of concurrent streams as one batch when
# they can (docs/diffusion.md), so their limit is also the largest batch, 4 images of SD 1.x or
# SDXL in fp16 on a 24 GB card; the super-resolution and face models (upscale, correct) run
# each stream's tiles on their own, two at a time keep a GPU busy. The model-free families (file
# writes, crops, resizes) are sized for a few CPU cores; so are edit (text, metadata; the
# safety checker is one small CLIP call per image) and text (prompt transforms).
DEFAULT_MAX_STREAMS: dict[str, int] = {
    "source": 4,
    "blend": 4,
    "correct": 2,
    "upscale": 2,
    "persist": 16,
    "reduce": 16,
    "edit": 8,
    "text": 8,
}


def max_streams_env(family: str) -> str:
    return f"TILECHAIN_{family.upper()}_MAX_STREAMS"


def replicas_env(family: str) -> str:
    return f"TILECHAIN_{family.upper()}_REPLICAS"


# How often the replicas behind a dns: target are counted again (as often as the gateway's
# channels may re-resolve it: services/core/config.py DNS_MIN_INTERVAL_MS)
RECOUNT_SECONDS = 10.0

Resolver = Callable[..., list]


def dns_name(target: str) -> tuple[str, int]:
    """The name and port of a gRPC dns: target (dns:///name:port, dns://authority/name:port,
    dns:name:port)."""
    rest = target.removeprefix("dns:")
    if rest.startswith("//"):
        rest = rest[2:].partition("/")[2]
    host, _, port = rest.rpartition(":")
    return host.strip("[]"), int(port)


def replica_addresses(address: str, resolve: Resolver = socket.getaddrinfo) -> list[str]:
    """Each replica's host:port in an address setting: the comma-separated addresses of a list
    (or of an ipv4:/ipv6: target); for a dns: target (a Kubernetes headless Service), the
    addresses the name resolves to now, one per ready pod, none when it has none (scaled to
    zero); anything else (one host:port, unix:...) as one replica."""
    target = address.strip()
    if target.startswith("dns:"):
        host, port = dns_name(target)
        try:
            ips = sorted({info[4][0] for info in resolve(host, port, type=socket.SOCK_STREAM)})
        except OSError:  # socket.gaierror: no such name, or no address (no ready pod)
            return []
        return [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips]
    for scheme in ("ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target.removeprefix(scheme)
            break
    else:
        if target.startswith(("unix:", "unix-abstract:", "xds:")):
            return [target]
    return [a.strip() for a in target.split(",") if a.strip()] or [target]


def replica_count(address: str, resolve: Resolver = socket.getaddrinfo) -> int:
    """How many replicas an address setting names (replica_addresses); a dns: target may have
    none, any other setting counts as one at least."""
    count = len(replica_addresses(address, resolve))
    return count if address.strip().startswith("dns:") else max(1, count)


class StreamLimits:
    """Each family's stream limit over all its replicas: its per-replica limit times its
    replicas. TILECHAIN_<FAMILY>_REPLICAS fixes the count; else it is counted from the address
    setting, and counted again every RECOUNT_SECONDS for a dns: target, whose replicas come and
    go (an autoscaler adds pods as jobs wait; admission then lets more jobs in)."""

    def __init__(self, per_replica: dict[str, int], addresses: dict[str, str], env: dict[str, str] | None = None,
                 resolve: Resolver = socket.getaddrinfo) -> None:
        env = dict(os.environ) if env is None else env
        self.per_replica = per_replica
        self.addresses = addresses
        self.resolve = resolve
        self.fixed = {f: positive_int(env, replicas_env(f), 1, minimum=0) for f in FAMILIES if env.get(replicas_env(f))}
        self.changing = [f for f in FAMILIES if f not in self.fixed and addresses[f].strip().startswith("dns:")]
        self.replicas = {f: self.fixed[f] if f in self.fixed else replica_count(addresses[f], resolve) for f in FAMILIES}

    @property
    def limits(self) -> dict[str, int]:
        return {f: self.per_replica[f] * self.replicas[f] for f in FAMILIES}

    def recount(self) -> bool:
        """Count the changing families' replicas again; whether any count changed."""
        counts = {f: replica_count(self.addresses[f], self.resolve) for f in self.changing}
        changed = any(self.replicas[f] != n for f, n in counts.items())
        self.replicas.update(counts)
        return changed

    async def follow(self, store: JobStore) -> None:
        """Keep the store's limits to the replicas there are (for as long as the gateway runs)."""
        if not self.changing:
            return
        while True:
            await asyncio.sleep(RECOUNT_SECONDS)  # a period: DNS has no change notifications
            try:
                if await asyncio.to_thread(self.recount):
                    log.info("replicas per family now %s: stream limits %s", self.replicas, self.limits)
                    await store.set_limits(self.limits)
            except store.errors as exc:
                log.warning("updating the stream limits: %s", exc)


def positive_int(env: dict[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r}: expected a whole number") from None
    if value < minimum:
        raise SystemExit(f"{name}={raw!r}: must be at least {minimum}")
    return value


def seconds(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r}: expected seconds") from None
    if value <= 0:
        raise SystemExit(f"{name}={raw!r}: must be more than 0")
    return value


@dataclass(frozen=True)
class GatewaySettings:
    job_store: str = ""               # the store's URL (default: default_store(port))
    gateway_id: str = ""              # this gateway's name in the store; a restart keeps it
    max_jobs: int = 16                # jobs this gateway runs at once (0: it only takes requests)
    max_attempts: int = 3
    lease: float = 30.0               # seconds a gateway's claim on a job lives without renewal
    retention: float = 7 * 24 * 3600.0  # seconds an ended job stays readable
    retry_wait: float = 30.0          # seconds a retry waits for its services to be reachable
    watch_tile_bytes: int = 32 * 1024 * 1024  # tile events one watcher may have waiting
    per_replica: dict[str, int] = field(default_factory=dict)  # streams one replica of each family takes

    @classmethod
    def from_env(cls, listen: str, job_store: str | None = None) -> GatewaySettings:
        env = dict(os.environ)
        per_replica = {f: positive_int(env, max_streams_env(f), DEFAULT_MAX_STREAMS[f]) for f in FAMILIES}
        port = listen.rpartition(":")[2]
        return cls(
            job_store=job_store or env.get("TILECHAIN_JOB_STORE") or default_store(port),
            gateway_id=env.get("TILECHAIN_GATEWAY_ID") or f"{socket.gethostname()}:{port}",
            max_jobs=positive_int(env, "TILECHAIN_GATEWAY_MAX_JOBS", cls.max_jobs, minimum=0),
            max_attempts=positive_int(env, "TILECHAIN_JOB_MAX_ATTEMPTS", cls.max_attempts),
            lease=seconds(env, "TILECHAIN_JOB_LEASE_S", cls.lease),
            retention=seconds(env, "TILECHAIN_JOB_RETENTION_S", cls.retention),
            retry_wait=seconds(env, "TILECHAIN_JOB_RETRY_WAIT_S", cls.retry_wait),
            watch_tile_bytes=positive_int(env, "TILECHAIN_WATCH_BUFFER_BYTES", cls.watch_tile_bytes, minimum=0),
            per_replica=per_replica,
        )
