"""The stage-family services. Each family's stages live in one module (source.py, blend.py,
...); every family runs the same servicer from core/."""

from __future__ import annotations

import argparse
import asyncio
import logging

from .core.config import DEFAULT_PORTS, FAMILIES, Settings, address_env, listen_address, preload_names
from .core.server import serve, setup_logging, tune_malloc
from .core.servicer import StageServicer, add_stage_servicer

log = logging.getLogger("tilechain.stage")


def main(family: str, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"tilechain serve {family}")
    parser.add_argument(
        "--address",
        default=listen_address(family),
        help=f"host:port to listen on (env {address_env(family)}, default port {DEFAULT_PORTS[family]})",
    )
    parser.add_argument(
        "--preload",
        default=None,
        help="models to load before reporting SERVING, comma-separated; NAME or STAGE-TYPE:NAME "
        "(env TILECHAIN_PRELOAD; default: the preload list in models.yaml)",
    )
    args = parser.parse_args(argv)
    if args.address is None:
        parser.error(f"{address_env(family)} names several replicas or a resolver target: give this replica its own --address")
    tune_malloc()
    setup_logging()
    servicer = StageServicer(family, Settings.from_env())
    names = preload_names(args.preload, servicer.models.preload)

    def add(server) -> list[str]:
        return [add_stage_servicer(servicer, server)]

    async def preload() -> None:
        loaded = await asyncio.to_thread(servicer.preload, names)
        log.info("preloaded: %s", ", ".join(loaded) or "nothing this family takes")

    asyncio.run(serve(args.address, add, component=f"{family} service", ready=preload if names else None))


__all__ = ["FAMILIES", "main"]
