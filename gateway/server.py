"""The gateway service: validates and plans chains, queues them as jobs in the job store, runs
its share of them (gateway/jobs.py) and streams any job's events to its watchers."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import time
from collections import Counter
from typing import AsyncIterator, Awaitable, Callable, TypeVar

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

from .chain import ChainError, PlannedStage, plan_chain
from .families import Family, FamilyUnavailable, connect
from .jobs import Worker, new_job_id
from .upload import receive_upload
from .settings import GatewaySettings, StreamLimits
from .store import SCHEMES, open_store
from .store.base import FAILED, RUNNING, JobStore, NewJob, StoreConfig, StoreError, add_progress_summary
from .watch import FINAL, JobNotFound, Watcher, WatcherClosed, follow

log = logging.getLogger("tilechain.gateway")

CANCEL_WAIT = 5.0  # CancelJob waits this long for a running job to end before it answers
STOPPING = "stopping"

Reply = TypeVar("Reply")


def store_unavailable(exc: BaseException) -> str:
    return f"the job store is unavailable ({type(exc).__name__}: {exc}); try again"


def answers_store_errors(
    handler: Callable[[GatewayServicer, object, grpc.aio.ServicerContext], Awaitable[Reply]],
) -> Callable[[GatewayServicer, object, grpc.aio.ServicerContext], Awaitable[Reply]]:
    """A unary handler that answers UNAVAILABLE when the job store fails, not UNKNOWN."""

    @functools.wraps(handler)
    async def wrapped(self: GatewayServicer, request: object, context: grpc.aio.ServicerContext) -> Reply:
        try:
            return await handler(self, request, context)
        except self.store.errors as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, store_unavailable(exc))

    return wrapped


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(
        self, families: dict[str, Family], settings: Settings, gateway: GatewaySettings, limits: StreamLimits,
        store: JobStore, worker: Worker,
    ) -> None:
        self.families = families
        self.settings = settings
        self.gateway = gateway
        self.limits = limits
        self.store = store
        self.worker = worker
        self.watchers: set[Watcher] = set()
        self.stopping = False
        self.background: set[asyncio.Task[object]] = set()

    # --- accepting jobs ------------------------------------------------------------------------

    async def _prepare(self, request: gateway_pb2.ChainRequest, context: grpc.aio.ServicerContext, deadline: float = 0.0) -> NewJob:
        """Validate and plan the whole chain: a bad request is refused here and never queued."""
        if self.stopping:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the gateway {self.gateway.gateway_id} is stopping; send the request to another")
        job_id = new_job_id()
        try:
            stages = await plan_chain(request, self.families, self.settings, job_id)
            needs = self._needs(stages)
        except ChainError as exc:
            await context.abort(exc.code, exc.message)
        self.worker.plans.put(job_id, stages)
        return NewJob(job_id, request.SerializeToString(), needs, len(stages), self.gateway.max_attempts, deadline)

    def _needs(self, stages: list[PlannedStage]) -> dict[str, int]:
        """The streams per family the job is charged at admission: every stage streams for the
        whole job, so one per stage, but at most the family's whole limit (a family scaled to
        zero counts as one replica). A chain with more stages of a family than that (two
        img2img passes where one GPU stream is the limit) is admitted once the family is idle
        and runs alone on it: it could never start otherwise, and its stages stream as one
        pipeline, not as independent jobs."""
        needs = Counter(stage.family.name for stage in stages)
        return {family: min(count, self.limits.per_replica[family] * max(1, self.limits.replicas[family])) for family, count in needs.items()}

    @answers_store_errors
    async def SubmitChain(self, request: gateway_pb2.ChainRequest, context: grpc.aio.ServicerContext) -> gateway_pb2.JobRef:
        job = await self._prepare(request, context)
        await self.store.submit(job)
        return gateway_pb2.JobRef(job_id=job.id)

    @answers_store_errors
    async def SubmitChainStream(
        self, request_iterator: AsyncIterator[gateway_pb2.ChainUpload], context: grpc.aio.ServicerContext
    ) -> gateway_pb2.JobRef:
        """SubmitChain with the attachments uploaded in chunks (no message size limit). The chain
        is checked before the upload and each file's header as soon as it arrives; the job's
        request, bytes included, then goes to the job store like any other (a job must survive
        a restart of this gateway)."""
        try:
            request, data = await receive_upload(request_iterator, self.families, self.settings)
        except ChainError as exc:
            await context.abort(exc.code, exc.message)
        for attachment, buffer in zip(request.attachments, data):
            attachment.data = bytes(buffer)
        del data
        return await self.SubmitChain(request, context)

    async def RunChain(
        self, request: gateway_pb2.ChainRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.JobEvent]:
        remaining = context.time_remaining()
        # the caller's deadline travels with the job and reaches every service
        deadline = time.time() + remaining if remaining is not None else 0.0
        job = await self._prepare(request, context, deadline)
        ended = False
        try:
            async for event in self._follow(job.id, context, replay=False, job=job):
                if event.WhichOneof("kind") == "status":
                    ended = True
                    if event.status.state == FAILED:
                        await context.abort(status_code(event.status.code), event.status.message)
                yield event
        finally:
            if not ended and not self.stopping:
                # the caller went away: stop the services' work, wherever the job runs
                self._in_background(self.store.cancel(job.id))

    # --- answering for any job -----------------------------------------------------------------

    async def _follow(
        self, job_id: str, context: grpc.aio.ServicerContext, replay: bool, job: NewJob | None = None
    ) -> AsyncIterator[gateway_pb2.JobEvent]:
        watcher = Watcher(self.gateway.watch_tile_bytes)
        if self.stopping:
            watcher.close(STOPPING)
        self.watchers.add(watcher)
        submit = (lambda: self.store.submit(job)) if job is not None else None
        try:
            async for event in follow(self.store, job_id, watcher, replay, submit):
                yield event
        except JobNotFound:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"job_id: no job {job_id!r}")
        except self.store.errors as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, store_unavailable(exc))
        except WatcherClosed as exc:
            if exc.reason == STOPPING:
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the gateway {self.gateway.gateway_id} is stopping; job {job_id} goes on (another gateway, "
                    f"or this one after its restart, runs it): follow it with WatchJob(job_id={job_id!r}) on another gateway",
                )
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"job {job_id}: {exc.reason}; watch it again with WatchJob")
        finally:
            self.watchers.discard(watcher)

    @answers_store_errors
    async def GetJob(self, request: gateway_pb2.JobRef, context: grpc.aio.ServicerContext) -> gateway_pb2.JobStatus:
        status = await self._status(request.job_id)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"job_id: no job {request.job_id!r}")
        return status

    async def _status(self, job_id: str) -> gateway_pb2.JobStatus | None:
        """The job's status with onnx-web's progress summary, from its compact history."""
        found = await self.store.snapshot(job_id)
        if found is None:
            return None
        status, history = found
        add_progress_summary(status, history)
        return status

    async def WatchJob(self, request: gateway_pb2.JobRef, context: grpc.aio.ServicerContext) -> AsyncIterator[gateway_pb2.JobEvent]:
        async for event in self._follow(request.job_id, context, replay=True):
            yield event

    @answers_store_errors
    async def CancelJob(self, request: gateway_pb2.JobRef, context: grpc.aio.ServicerContext) -> gateway_pb2.JobStatus:
        """A queued job ends at once; a running one is stopped by the gateway running it, which
        ends its services' streams: this answers with its final status (or, if that gateway
        takes longer than CANCEL_WAIT, with the status as it is, the cancel still pending)."""
        ended = Watcher(tile_budget=0)
        async with self.store.subscribe(request.job_id, ended.offer):
            status = await self.store.cancel(request.job_id)
            if status is None:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"job_id: no job {request.job_id!r}")
            if status.state == RUNNING:
                try:
                    await asyncio.wait_for(self._until_final(ended), CANCEL_WAIT)
                except asyncio.TimeoutError:
                    pass
        return await self._status(request.job_id) or status

    @staticmethod
    async def _until_final(watcher: Watcher) -> None:
        while await watcher.get() != FINAL:
            pass

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

    # --- stopping ------------------------------------------------------------------------------

    def _in_background(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def stop(self) -> None:
        """SIGTERM: watchers are told where to follow their jobs, running jobs go back to the queue."""
        self.stopping = True
        for watcher in list(self.watchers):
            watcher.close(STOPPING)
        await self.worker.stop()
        await asyncio.gather(*self.background, return_exceptions=True)


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
    parser.add_argument("--job-store", default=None, help=f"where jobs live (env TILECHAIN_JOB_STORE, default var/jobs-PORT.db): {SCHEMES}")
    args = parser.parse_args(argv)
    tune_malloc()
    setup_logging()
    addresses = {f: getattr(args, f"{f}_address") for f in FAMILIES}
    gateway = GatewaySettings.from_env(args.address, args.job_store)
    limits = StreamLimits(gateway.per_replica, addresses)

    async def run() -> None:
        try:
            families = connect(addresses)
        except ValueError as exc:
            parser.error(str(exc))
        settings = Settings.from_env()
        config = StoreConfig(limits=limits.limits, lease=gateway.lease, retention=gateway.retention)
        try:
            store = open_store(gateway.job_store, config)
            await store.open()
        except (ValueError, StoreError) as exc:
            raise SystemExit(f"tilechain gateway: {exc}") from None
        log.info(
            "job store %s; gateway %s runs up to %d jobs; streams per family %s",
            gateway.job_store, gateway.gateway_id, gateway.max_jobs, limits.limits,
        )
        worker = Worker(store, families, settings, gateway)
        await worker.start()
        following = asyncio.create_task(limits.follow(store))
        servicer = GatewayServicer(families, settings, gateway, limits, store, worker)

        def add(server: grpc.aio.Server) -> list[str]:
            gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
            return [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name]

        try:
            await serve(args.address, add, max_receive_bytes=GATEWAY_MAX_REQUEST_BYTES, on_stop=servicer.stop, fixed_window=False)
        finally:
            following.cancel()
            await store.close()

    asyncio.run(run())
