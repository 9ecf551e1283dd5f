"""The gateway's own settings: its job store, how many jobs it runs, attempts and leases, and the
stream limits that admission keeps every family within. Each from an environment variable, the
store also from a flag; docs/jobs.md lists them with their defaults."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

from tilechain.services.core.config import FAMILIES

from .store import DEFAULT_STORE

# Concurrent streams one replica of a family serves. The model families are sized for one GPU:
# the diffusion families (source, blend) run the calls of concurrent streams as one batch when
# they can (docs/diffusion.md), so their limit is also the largest batch, 4 images of SD 1.x or
# SDXL in fp16 on a 24 GB card; the super-resolution and face models (upscale, correct) run
# each stream's tiles on their own, two at a time keep a GPU busy. The model-free families (file
# writes, crops, resizes) are sized for a few CPU cores.
DEFAULT_MAX_STREAMS: dict[str, int] = {
    "source": 4,
    "blend": 4,
    "correct": 2,
    "upscale": 2,
    "persist": 16,
    "reduce": 16,
}


def max_streams_env(family: str) -> str:
    return f"TILECHAIN_{family.upper()}_MAX_STREAMS"


def replicas_env(family: str) -> str:
    return f"TILECHAIN_{family.upper()}_REPLICAS"


def replica_count(family: str, address: str, env: dict[str, str]) -> int:
    """How many replicas serve a family: TILECHAIN_<FAMILY>_REPLICAS when set (a DNS name that
    resolves to several pods), else the number of comma-separated addresses."""
    explicit = env.get(replicas_env(family))
    if explicit:
        return max(1, int(explicit))
    return max(1, len([a for a in address.split(",") if a.strip()]))


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
    job_store: str = DEFAULT_STORE
    gateway_id: str = ""              # this gateway's name in the store; a restart keeps it
    max_jobs: int = 16                # jobs this gateway runs at once (0: it only takes requests)
    max_attempts: int = 3
    lease: float = 30.0               # seconds a gateway's claim on a job lives without renewal
    retention: float = 7 * 24 * 3600.0  # seconds an ended job stays readable
    retry_wait: float = 30.0          # seconds a retry waits for its services to be reachable
    watch_tile_bytes: int = 32 * 1024 * 1024  # tile events one watcher may have waiting
    stream_limits: dict[str, int] = field(default_factory=dict)  # per family, over all replicas
    per_replica: dict[str, int] = field(default_factory=dict)
    replicas: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_env(cls, addresses: dict[str, str], listen: str, job_store: str | None = None) -> GatewaySettings:
        env = dict(os.environ)
        per_replica = {f: positive_int(env, max_streams_env(f), DEFAULT_MAX_STREAMS[f]) for f in FAMILIES}
        replicas = {f: replica_count(f, addresses[f], env) for f in FAMILIES}
        port = listen.rpartition(":")[2]
        return cls(
            job_store=job_store or env.get("TILECHAIN_JOB_STORE") or DEFAULT_STORE,
            gateway_id=env.get("TILECHAIN_GATEWAY_ID") or f"{socket.gethostname()}:{port}",
            max_jobs=positive_int(env, "TILECHAIN_GATEWAY_MAX_JOBS", cls.max_jobs, minimum=0),
            max_attempts=positive_int(env, "TILECHAIN_JOB_MAX_ATTEMPTS", cls.max_attempts),
            lease=seconds(env, "TILECHAIN_JOB_LEASE_S", cls.lease),
            retention=seconds(env, "TILECHAIN_JOB_RETENTION_S", cls.retention),
            retry_wait=seconds(env, "TILECHAIN_JOB_RETRY_WAIT_S", cls.retry_wait),
            watch_tile_bytes=positive_int(env, "TILECHAIN_WATCH_BUFFER_BYTES", cls.watch_tile_bytes, minimum=0),
            stream_limits={f: per_replica[f] * replicas[f] for f in FAMILIES},
            per_replica=per_replica,
            replicas=replicas,
        )
