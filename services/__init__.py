"""The stage-family services. Each family's stages live in one module (source.py, blend.py,
...); every family runs the same servicer from core/."""

from __future__ import annotations

import argparse
import asyncio

from tilechain.v1 import stage_pb2, stage_pb2_grpc

from .core.config import DEFAULT_PORTS, FAMILIES, Settings, address_env, listen_address
from .core.server import serve, setup_logging, tune_malloc
from .core.servicer import StageServicer


def main(family: str, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"tilechain serve {family}")
    parser.add_argument(
        "--address",
        default=listen_address(family),
        help=f"host:port to listen on (env {address_env(family)}, default port {DEFAULT_PORTS[family]})",
    )
    args = parser.parse_args(argv)
    if args.address is None:
        parser.error(f"{address_env(family)} names several replicas or a resolver target: give this replica its own --address")
    tune_malloc()
    setup_logging()
    servicer = StageServicer(family, Settings.from_env())

    def add(server) -> list[str]:
        stage_pb2_grpc.add_StageServicer_to_server(servicer, server)
        return [stage_pb2.DESCRIPTOR.services_by_name["Stage"].full_name]

    asyncio.run(serve(args.address, add, component=f"{family} service"))


__all__ = ["FAMILIES", "main"]
