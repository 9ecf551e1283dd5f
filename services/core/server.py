"""Running a gRPC service process: grpc.aio with health checking, reflection, raised message
limits, and a graceful drain of in-flight streams on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from .config import channel_options

log = logging.getLogger("tilechain.server")

DRAIN_SECONDS = 30.0


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


async def serve(
    address: str,
    add_services: Callable[[grpc.aio.Server], list[str]],
    max_receive_bytes: int | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then stop accepting and drain for up to DRAIN_SECONDS.
    add_services registers the servicers and returns their full service names."""
    options = channel_options()
    if max_receive_bytes:
        # replace the default, not append: gRPC takes the first of two equal keys
        options = [o for o in options if o[0] != "grpc.max_receive_message_length"]
        options.append(("grpc.max_receive_message_length", max_receive_bytes))
    server = grpc.aio.server(options=options)
    names = add_services(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    if server.add_insecure_port(address) == 0:
        raise SystemExit(f"cannot listen on {address}")
    await server.start()
    for name in ["", *names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving %s on %s", ", ".join(names), address)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("draining in-flight streams (up to %.0fs)", DRAIN_SECONDS)
    await health_servicer.enter_graceful_shutdown()
    await server.stop(DRAIN_SECONDS)
    log.info("stopped")
