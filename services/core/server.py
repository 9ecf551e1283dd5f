"""Running a gRPC service process: grpc.aio with health checking, reflection, the shared server
options (raised message limits, keepalives, a maximum connection age: config.server_options),
and a graceful drain of in-flight streams on SIGTERM."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
from typing import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .config import Settings, server_options
from .errors import InternalErrors

log = logging.getLogger("tilechain.server")

DRAIN_SECONDS = 30.0


# glibc's mallopt parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
DEFAULT_MMAP_THRESHOLD = 1 << 30


def tune_malloc() -> int:
    """Called first thing in every server process, before other threads exist (they keep the
    arena they started with). Serve large allocations from the heap instead of fresh mmaps; returns the threshold set
    (0: left alone). By default glibc maps every block over 32 MiB anew and unmaps it on free,
    so each tile's tensors and buffers page-fault in again: with an ESRGAN x4 on a CPU that
    was more than half the model's CPU time (bench/RESULTS.md, "Malloc tuning"), at the cost
    of a higher resident size, since freed memory stays with the process for reuse.
    One arena: the stage code runs in worker threads, and a thread's own arena grows in heaps
    of at most 64 MiB, so its larger blocks would be mmapped whatever the threshold; only the
    main arena (brk) holds them.
    TILECHAIN_MALLOC_MMAP_THRESHOLD sets the threshold in bytes; 0 keeps glibc's behaviour."""
    threshold = int(os.environ.get("TILECHAIN_MALLOC_MMAP_THRESHOLD", DEFAULT_MMAP_THRESHOLD))
    if threshold <= 0:
        return 0
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return 0
    if not (libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(min(threshold, 2**31 - 1)))
            and libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(min(4 * threshold, 2**31 - 1)))
            and libc.mallopt(M_ARENA_MAX, ctypes.c_int(1))):
        log.warning("glibc refused the malloc thresholds (TILECHAIN_MALLOC_MMAP_THRESHOLD=%d)", threshold)
        return 0
    return threshold


class EndedCallSend(logging.Filter):
    """gRPC's asyncio server logs an ERROR with a traceback when a streaming method's response
    cannot be sent because the call has already ended (the caller cancelled or its deadline
    passed while a tile was on its way). The servicer already logs the stage as cancelled, so
    this becomes one INFO line without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and record.exc_info and type(record.exc_info[1]).__name__ == "ExecuteBatchError":
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "a response was not sent: the call had ended (%s)", (record.getMessage(),)
            record.exc_info = record.exc_text = None
        return True


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("grpc._cython.cygrpc").addFilter(EndedCallSend())


async def serve(
    address: str,
    add_services: Callable[[grpc.aio.Server], list[str]],
    max_receive_bytes: int | None = None,
    component: str = "",
    on_stop: Callable[[], Awaitable[None]] | None = None,
    ready: Callable[[], Awaitable[None]] | None = None,
    stopping: asyncio.Event | None = None,
    fixed_window: bool = True,
) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting and drain for up to DRAIN_SECONDS.
    add_services registers the servicers and returns their full service names. component
    names the process in INTERNAL errors ("persist service"; default: from the service name);
    on_stop runs once health says NOT_SERVING, before the drain (the gateway hands its jobs
    back there). With ready (preloading models), the health check answers NOT_SERVING until it
    has returned; if it raises, the process exits with its message. stopping: an event that
    stops the server in place of the signals (for running it inside another program).
    fixed_window: config.flow_control_options for what callers send (the services; the
    gateway's callers may be far away and keep gRPC's probing)."""
    settings = Settings.from_env()
    internal_errors = InternalErrors(component, [settings.output_root, settings.models_root])
    server = grpc.aio.server(options=server_options(max_receive_bytes, fixed_window), interceptors=[internal_errors])
    names = add_services(server)
    internal_errors.component = component or names[0].rsplit(".", 1)[-1].lower()
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:  # grpcio raises where older releases returned 0
        bound = 0
    if bound == 0:
        raise SystemExit(f"cannot listen on {address}: the address is in use or not this machine's")
    if stopping is None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    if ready is not None:
        log.info("listening on %s; NOT_SERVING until start-up work is done", address)
        work = asyncio.ensure_future(ready())
        stop = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not work.done():  # asked to stop while starting up
            work.cancel()
            await server.stop(0)
            log.info("stopped during start-up")
            return
        if work.exception() is not None:
            log.error("start-up failed: %s", work.exception())
            await server.stop(0)
            raise SystemExit(f"start-up failed: {work.exception()}")
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on %s", ", ".join(names), address)
    await stopping.wait()
    log.info("draining in-flight streams (up to %.0fs)", DRAIN_SECONDS)
    await health_servicer.enter_graceful_shutdown()
    if on_stop is not None:
        await on_stop()
    await server.stop(DRAIN_SECONDS)
    log.info("stopped")
