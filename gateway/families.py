"""Clients for the stage-family services, one channel each."""

from __future__ import annotations

import grpc

from tilechain.services.core.config import FAMILIES, channel_options
from tilechain.services.core.wire import serialize
from tilechain.v1 import stage_pb2, stage_pb2_grpc


class FamilyUnavailable(Exception):
    def __init__(self, family: str, address: str, detail: str) -> None:
        super().__init__(f"the {family} service at {address} is unavailable: {detail}")
        self.family = family


class Family:
    def __init__(self, name: str, address: str) -> None:
        self.name = name
        self.address = address
        self.channel = grpc.aio.insecure_channel(address, options=channel_options())
        self.stub = stage_pb2_grpc.StageStub(self.channel)
        # Process with its messages as bytes: tiles pass through the gateway unparsed
        # (core/wire.py); requests may be messages or already serialised tiles
        self.process = self.channel.stream_stream(
            "/tilechain.v1.Stage/Process", request_serializer=serialize, response_deserializer=None
        )

    async def describe(self, timeout: float | None = 10.0) -> stage_pb2.StageCatalog:
        try:
            return await self.stub.Describe(stage_pb2.DescribeRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise FamilyUnavailable(self.name, self.address, exc.details() or exc.code().name) from None
            raise


def family_of(stage_type: str) -> str | None:
    """Stage types are named family-what (onnx-web's convention): the prefix is the family."""
    prefix = stage_type.split("-", 1)[0]
    return prefix if prefix in FAMILIES and "-" in stage_type else None


def connect(addresses: dict[str, str]) -> dict[str, Family]:
    return {name: Family(name, addresses[name]) for name in FAMILIES}
