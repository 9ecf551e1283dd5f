"""Job stores: where the gateway keeps jobs (gateway/store/base.py has the interface)."""

from __future__ import annotations

from pathlib import Path

from .base import JobStore, StoreConfig

DEFAULT_STORE = "sqlite:///var/jobs.db"
SCHEMES = "sqlite:///PATH (relative, or sqlite:////absolute), redis://HOST:PORT/DB (also rediss://, valkey://)"


def open_store(url: str, config: StoreConfig) -> JobStore:
    """The store a TILECHAIN_JOB_STORE URL names (not yet opened: await store.open())."""
    if url.startswith("sqlite:///"):
        from .sqlite import SqliteStore

        return SqliteStore(Path(url.removeprefix("sqlite:///")), config)
    if url.startswith(("redis://", "rediss://", "valkey://", "valkeys://")):
        from .redis import RedisStore

        return RedisStore(url.replace("valkey", "redis", 1), config)
    raise ValueError(f"job store {url!r}: expected {SCHEMES}")
