"""Picking a port for a server that is about to start (the local stack, the S3 server's internal
ports, the tests and the benchmarks all pick theirs here).

A port from bind(0) is one of the kernel's ephemeral ports, the range every outgoing connection
takes its source port from. Between the pick and the server's own bind, which for SeaweedFS's
volume server comes seconds later while its master and filer already dial each other, such a
port can be taken as a source port and the server dies on "address already in use". So ports
are picked below the ephemeral range, where only an explicit bind can take them, and never twice
in one process."""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 10000  # below this live the well-known and registered defaults other software binds
_handed_out: set[int] = set()
_lock = threading.Lock()


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (32768 on Linux by default)."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def bindable(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def unused_port(host: str = "127.0.0.1") -> int:
    """A port on host that nothing is bound to and that this process has not handed out yet:
    below the ephemeral range when the range leaves room there, else the kernel's own pick."""
    high = ephemeral_low()
    with _lock:
        if high - LOWEST >= 1000:
            for _ in range(200):
                port = random.randrange(LOWEST, high)
                if port not in _handed_out and bindable(host, port):
                    _handed_out.add(port)
                    return port
        while True:  # no room below the ephemeral range (or all of it taken): what bind(0) gives
            with socket.socket() as probe:
                probe.bind((host, 0))
                port = probe.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port
