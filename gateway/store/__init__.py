"""Job stores: where the gateway keeps jobs (gateway/store/base.py has the interface)."""

from __future__ import annotations

from pathlib import Path

from .base import JobStore, StoreConfig



def default_store(port: str) -> str:
    """A SQLite file under var/ per gateway port: a gateway restarted on its port finds its queue,
    and two local stacks side by side (on other ports) never take each other's jobs."""
    return f"sqlite:///var/jobs-{port}.db"

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
