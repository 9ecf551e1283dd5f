"""Clients for the stage-family services: one channel per family, balanced over its replicas.

A family's address setting (TILECHAIN_<FAMILY>_ADDR, --<family>-address) is one host:port, a
comma-separated list of them (several replicas), or a gRPC target such as
dns:///upscale.tilechain.svc.cluster.local:50054 (a Kubernetes headless Service). The channel
resolves it to every replica and spreads calls over them with gRPC's round_robin policy, which
picks only connected replicas: one that died is skipped until it answers again (the channel
options, keepalives and reconnect backoff are in services/core/config.py)."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import grpc

from tilechain.services.core.config import FAMILIES, RECONNECT_WAIT_S, channel_target, family_channel_options
from tilechain.services.core.wire import serialize
from tilechain.v1 import stage_pb2, stage_pb2_grpc

from .settings import replica_addresses


class FamilyUnavailable(Exception):
    def __init__(self, family: str, address: str, detail: str) -> None:
        super().__init__(f"the {family} service at {address} is unavailable: {detail}")
        self.family = family
        self.address = address
        self.detail = detail


class Family:
    def __init__(self, name: str, address: str) -> None:
        self.name = name
        self.address = address  # as configured, for messages
        try:
            self.target = channel_target(address)
        except ValueError as exc:
            raise ValueError(f"the {name} service's address (--{name}-address): {exc}") from None
        self.channel = grpc.aio.insecure_channel(self.target, options=family_channel_options())
        self.stub = stage_pb2_grpc.StageStub(self.channel)
        # Process with its messages as bytes: tiles pass through the gateway unparsed
        # (core/wire.py); requests may be messages or already serialised tiles
        self.process = self.channel.stream_stream(
            "/tilechain.v1.Stage/Process", request_serializer=serialize, response_deserializer=None
        )

    async def unary(self, method: Callable[..., Awaitable[Any]], request: Any, timeout: float) -> Any:
        """A unary call that tolerates a channel still in its reconnect backoff: on UNAVAILABLE
        (every replica unreachable, or the one picked just died) it is tried once more, waiting
        up to RECONNECT_WAIT_S for a connected replica. A service that stays down fails with the
        first error, which says why (e.g. Connection refused)."""
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            first = exc
        try:
            return await method(request, timeout=min(timeout, RECONNECT_WAIT_S), wait_for_ready=True)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise first from None
            raise

    async def describe(self, timeout: float = 10.0) -> stage_pb2.StageCatalog:
        try:
            return await self.unary(self.stub.Describe, stage_pb2.DescribeRequest(), timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise FamilyUnavailable(self.name, self.address, exc.details() or exc.code().name) from None
            raise

    async def plan(self, start: stage_pb2.StageStart, timeout: float = 10.0) -> stage_pb2.PlanResult:
        return await self.unary(self.stub.Plan, start, timeout)

    async def finish(self, request: stage_pb2.FinishRequest, timeout: float = 60.0) -> list[stage_pb2.Artifact]:
        """Stage.Finish on every replica, not one that round_robin picks: a job's streams may
        have run on any of them, and each publishes (or discards) what it staged itself, on
        its own volume or a shared one (where the first to run publishes it all). The
        artifacts published, over every replica."""
        replicas = replica_addresses(self.address)
        if len(replicas) <= 1:
            return list((await self.unary(self.stub.Finish, request, timeout)).artifacts)

        async def finish_on(address: str) -> list[stage_pb2.Artifact]:
            async with grpc.aio.insecure_channel(address, options=family_channel_options()) as channel:
                return list((await stage_pb2_grpc.StageStub(channel).Finish(request, timeout=timeout)).artifacts)

        results = await asyncio.gather(*(finish_on(a) for a in replicas))
        return [artifact for artifacts in results for artifact in artifacts]


def family_of(stage_type: str) -> str | None:
    """Stage types are named family-what (onnx-web's convention): the prefix is the family."""
    prefix = stage_type.split("-", 1)[0]
    return prefix if prefix in FAMILIES and "-" in stage_type else None


def connect(addresses: dict[str, str]) -> dict[str, Family]:
    return {name: Family(name, addresses[name]) for name in FAMILIES}
