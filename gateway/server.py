"""The gateway service: validates and plans chains, runs them as jobs, streams their events."""

from __future__ import annotations

import argparse
import asyncio
from typing import AsyncIterator

import grpc

from tilechain.services.core.config import (
    DEFAULT_PORTS,
    FAMILIES,
    GATEWAY_MAX_REQUEST_BYTES,
    Settings,
    address_env,
    default_address,
)
from tilechain.services.core.server import serve, setup_logging, tune_malloc
from tilechain.v1 import gateway_pb2, gateway_pb2_grpc

from .chain import ChainError, plan_chain
from .families import Family, FamilyUnavailable, connect
from .jobs import Job, JobTable
from .upload import receive_upload


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, families: dict[str, Family], settings: Settings) -> None:
        self.families = families
        self.settings = settings
        self.jobs = JobTable()

    async def _start(
        self, request: gateway_pb2.ChainRequest, context: grpc.aio.ServicerContext, attachment_data: list[bytearray] | None = None
    ) -> Job:
        """Validate and plan the whole chain, then start it. Nothing runs for a bad request."""
        job_id = JobTable.new_id()
        try:
            stages = await plan_chain(request, self.families, self.settings, job_id, attachment_data)
        except ChainError as exc:
            await context.abort(exc.code, exc.message)
        job = Job(job_id, stages, request)
        self.jobs.add(job)
        return job

    async def _job(self, request: gateway_pb2.JobRef, context: grpc.aio.ServicerContext) -> Job:
        job = self.jobs.get(request.job_id)
        if job is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"job_id: no job {request.job_id!r}")
        return job

    async def RunChain(
        self, request: gateway_pb2.ChainRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.JobEvent]:
        job = await self._start(request, context)
        job.timeout = context.time_remaining()  # the caller's deadline reaches every service
        events = job.watch()
        first = asyncio.ensure_future(anext(events))  # subscribe before the job emits anything
        job.start()
        try:
            event = await first
            while True:
                if event.WhichOneof("kind") == "status" and event.status.state == gateway_pb2.JOB_STATE_FAILED:
                    await context.abort(status_code(event.status.code), event.status.message)
                yield event
                if event.WhichOneof("kind") == "status":
                    return
                event = await anext(events)
        finally:
            job.cancel()  # the caller went away (or the job ended): stop the services' work
            await events.aclose()

    async def SubmitChain(self, request: gateway_pb2.ChainRequest, context: grpc.aio.ServicerContext) -> gateway_pb2.JobRef:
        job = await self._start(request, context)
        job.start()
        return gateway_pb2.JobRef(job_id=job.id)

    async def SubmitChainStream(
        self, request_iterator: AsyncIterator[gateway_pb2.ChainUpload], context: grpc.aio.ServicerContext
    ) -> gateway_pb2.JobRef:
        try:
            request, data = await receive_upload(request_iterator, self.families, self.settings)
        except ChainError as exc:
            await context.abort(exc.code, exc.message)
        job = await self._start(request, context, data)
        job.start()
        return gateway_pb2.JobRef(job_id=job.id)

    async def GetJob(self, request: gateway_pb2.JobRef, context: grpc.aio.ServicerContext) -> gateway_pb2.JobStatus:
        return (await self._job(request, context)).status

    async def WatchJob(self, request: gateway_pb2.JobRef, context: grpc.aio.ServicerContext) -> AsyncIterator[gateway_pb2.JobEvent]:
        job = await self._job(request, context)
        async for event in job.watch():
            yield event

    async def CancelJob(self, request: gateway_pb2.JobRef, context: grpc.aio.ServicerContext) -> gateway_pb2.JobStatus:
        job = await self._job(request, context)
        job.cancel()
        if job.task is not None:
            await asyncio.wait([job.task])
        return job.status

    async def ListStages(
        self, request: gateway_pb2.ListStagesRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListStagesResponse:
        """The catalogs of the families that answer; the others are listed as down."""
        answers = await asyncio.gather(*(self.families[f].describe() for f in FAMILIES), return_exceptions=True)
        response = gateway_pb2.ListStagesResponse()
        for family, answer in zip(FAMILIES, answers):
            if isinstance(answer, FamilyUnavailable):
                response.families_down.add(family=family, address=answer.address, error=answer.detail)
            elif isinstance(answer, grpc.aio.AioRpcError):
                response.families_down.add(family=family, address=self.families[family].address, error=f"{answer.code().name}: {answer.details()}")
            elif isinstance(answer, BaseException):
                raise answer
            else:
                response.catalogs.append(answer)
        return response


def status_code(value: int) -> grpc.StatusCode:
    return next(c for c in grpc.StatusCode if c.value[0] == value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tilechain gateway")
    parser.add_argument(
        "--address", default=default_address("gateway"),
        help=f"host:port to listen on (env {address_env('gateway')}, default port {DEFAULT_PORTS['gateway']})",
    )
    for family in FAMILIES:
        parser.add_argument(
            f"--{family}-address", default=default_address(family),
            help=f"the {family} service: host:port, several (comma-separated replicas), or a gRPC "
            f"target such as dns:///NAME:PORT (env {address_env(family)})",
        )
    args = parser.parse_args(argv)
    tune_malloc()
    setup_logging()

    async def run() -> None:
        try:
            families = connect({f: getattr(args, f"{f}_address") for f in FAMILIES})
        except ValueError as exc:
            parser.error(str(exc))
        servicer = GatewayServicer(families, Settings.from_env())

        def add(server: grpc.aio.Server) -> list[str]:
            gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
            return [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name]

        await serve(args.address, add, max_receive_bytes=GATEWAY_MAX_REQUEST_BYTES)

    asyncio.run(run())
