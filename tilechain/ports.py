"""Picking a port for a server that is about to start (the local stack, the S3 server's internal
ports, the tests and the benchmarks all pick theirs here).

A port from bind(0) is one of the kernel's ephemeral ports, the range every outgoing connection
takes its source port from. Between the pick and the server's own bind, which for SeaweedFS's
volume server comes seconds later while its master and filer already dial each other, such a
port can be taken as a source port and the server dies on "address already in use". So ports
are picked below the ephemeral range, where only an explicit bind can take them, and never twice
in one process.

Two processes do not know each other's picks: the tests pick a stack's ports and start its
processes, one of which (the S3 server) then picks the internal ports of the weed it runs
while the others have not bound theirs yet. So the range is split in two pools: the
components' ports (the stack, tests, benches) and the internal ports of the servers the stack
runs beside its own (weed's master, volume and filer)."""

from __future__ import annotations

import random
import socket
import threading
from pathlib import Path

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST = 10000  # below this live the well-known and registered defaults other software binds
_handed_out: set[int] = set()
_lock = threading.Lock()
_random = random.Random()  # its own, seeded from the OS: a test seeding `random` changes nothing here


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (32768 on Linux by default)."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def pool(internal: bool) -> range:
    """The ports below the ephemeral range: its lower third for internal ports, the rest for
    components (empty when the ephemeral range leaves too little room below it)."""
    high = ephemeral_low()
    if high - LOWEST < 3000:
        return range(0)
    split = LOWEST + (high - LOWEST) // 3
    return range(LOWEST, split) if internal else range(split, high)


def bindable(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def unused_port(host: str = "127.0.0.1", internal: bool = False) -> int:
    """A port on host that nothing is bound to and that this process has not handed out yet,
    from the pool for components or (internal=True) for a backing server's internal listeners;
    the kernel's own pick when the pool is empty or taken."""
    ports = pool(internal)
    with _lock:
        for _ in range(200 if ports else 0):
            port = _random.choice(ports)
            if port not in _handed_out and bindable(host, port):
                _handed_out.add(port)
                return port
        while True:
            with socket.socket() as probe:
                probe.bind((host, 0))
                port = probe.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port
