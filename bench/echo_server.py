"""A bare gRPC echo service for the baseline in bench_chain.py: one bidi stream method that sends
every message back as it arrives. No proto: the handlers pass bytes through untouched (raw), or
parse a StageInput and answer with a StageOutput carrying the same tile (tile), which is the
protobuf work the gateway does for each tile it forwards.

    python bench/echo_server.py 127.0.0.1:PORT
"""

from __future__ import annotations

import asyncio
import signal
import sys

import grpc

from tilechain.services.core.config import channel_options
from tilechain.v1 import stage_pb2

SERVICE = "bench.Echo"
RAW = f"/{SERVICE}/Raw"
TILE = f"/{SERVICE}/Tile"


async def echo_raw(requests, context):
    async for message in requests:
        yield message


async def echo_tile(requests, context):
    async for message in requests:
        yield stage_pb2.StageOutput(tile=message.tile)


async def serve(address: str) -> None:
    server = grpc.aio.server(options=channel_options())
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Raw": grpc.stream_stream_rpc_method_handler(echo_raw),  # no (de)serializers: bytes in, bytes out
            "Tile": grpc.stream_stream_rpc_method_handler(
                echo_tile,
                request_deserializer=stage_pb2.StageInput.FromString,
                response_serializer=stage_pb2.StageOutput.SerializeToString,
            ),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    if server.add_insecure_port(address) == 0:
        raise SystemExit(f"cannot listen on {address}")
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop(1.0)


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1]))
