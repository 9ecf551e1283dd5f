"""Running jobs: each gateway's worker takes admitted jobs from the job store and runs them, one
attempt at a time, renewing its lease on each while it runs.

Stage N's output stream is piped into stage N+1's input stream tile by tile through a small
bounded queue, so the gateway never holds more than a few tiles per stage boundary and a slow
stage slows the ones before it instead of filling memory. Events go to the store (the compact
history, and on to every watcher on any gateway); no watcher can slow the job (gateway/watch.py)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from typing import AsyncIterator

import grpc

from tilechain.services.core.config import Settings
from tilechain.services.core.errors import internal_message
from tilechain.services.core.wire import is_tile_message
from tilechain.v1 import gateway_pb2, stage_pb2

from .chain import ChainError, PlannedStage, chain_families, finish_job, parse_chain, plan_chain, rpc_error
from .families import Family
from .settings import GatewaySettings
from .store.base import (
    CANCELLED,
    CANCELLED_CODE,
    FAILED,
    SUCCEEDED,
    Claim,
    JobStore,
    job_notice,
)

log = logging.getLogger("tilechain.gateway")

QUEUE_TILES = 4          # tiles buffered between two stages
PLANS_KEPT = 16          # plans made at submission, kept for this gateway's own first attempt


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


class LeaseLost(Exception):
    """Another gateway took this job over (this one stalled past its lease): stop, write nothing."""


class PlanCache:
    """The plans this gateway made when it accepted jobs: when it runs one of them itself, the
    first attempt needs no second planning. Small and bounded: a plan holds its attachments'
    bytes (decoded only while their tiles are sent)."""

    def __init__(self, size: int = PLANS_KEPT) -> None:
        self.size = size
        self.plans: OrderedDict[str, list[PlannedStage]] = OrderedDict()

    def put(self, job_id: str, stages: list[PlannedStage]) -> None:
        self.plans[job_id] = stages
        while len(self.plans) > self.size:
            self.plans.popitem(last=False)

    def take(self, job_id: str) -> list[PlannedStage] | None:
        return self.plans.pop(job_id, None)


class Run:
    """One attempt of one job on this gateway."""

    def __init__(self, claim: Claim, worker: Worker) -> None:
        self.claim = claim
        self.id = claim.id
        self.attempt = claim.attempt
        self.run = claim.run            # every run of the job, hand-backs included: the store's fencing token
        self.worker = worker
        self.store = worker.store
        self.request = gateway_pb2.ChainRequest.FromString(claim.request)
        self.stages: list[PlannedStage] = []
        self.history_length = 0      # where a tile sits among the stored events, for watchers
        self.stop_reason = ""        # why the task was cancelled: cancel, handback, lost
        self.started = False
        self.task: asyncio.Task[None] | None = None

    def stop(self, reason: str) -> None:
        """Cancel the attempt's task; one that has not begun yet sees the reason when it does (a
        task cancelled before its first step would skip its own clean-up)."""
        if self.stop_reason or (self.task is not None and self.task.done()):
            return
        self.stop_reason = reason
        if self.started and self.task is not None:
            self.task.cancel()

    # --- events --------------------------------------------------------------------------------

    async def emit(self, event: gateway_pb2.JobEvent) -> None:
        event.job_id = self.id
        if event.WhichOneof("kind") == "tile":
            await self.store.publish_tile(self.id, self.history_length, event)
            return
        index = await self.store.append(self.id, self.worker.owner, self.run, event)
        if index < 0:
            raise LeaseLost()
        self.history_length = max(self.history_length, index + 1)

    # --- the attempt ---------------------------------------------------------------------------

    async def execute(self) -> None:
        claim, store = self.claim, self.store
        self.started = True
        try:
            if self.stop_reason:  # stopped before it began
                raise asyncio.CancelledError()
            if claim.previous_owner:
                await self.emit(job_notice(
                    f"the gateway running attempt {self.attempt - 1} ({claim.previous_owner}) stopped; "
                    f"attempt {self.attempt} of {claim.max_attempts} starts over"
                ))
            self.stages = await self._plan()
            await self._emit_notices()
            await self._pipe()
            await self._publish()
            outcome = (SUCCEEDED, 0, "")
        except asyncio.CancelledError:
            if self.stop_reason == "lost":
                log.warning("job %s: attempt %d lost its lease; another gateway runs it", self.id, self.attempt)
                return  # nothing of this run may be touched: the new owner's run is under way
            await asyncio.shield(self._discard())
            if self.stop_reason == "handback":
                await asyncio.shield(self._hand_back())
                return
            outcome = (CANCELLED, CANCELLED_CODE, "cancelled")
        except LeaseLost:
            log.warning("job %s: attempt %d lost its lease; another gateway runs it", self.id, self.attempt)
            return
        except ChainError as exc:
            await asyncio.shield(self._discard())
            if exc.code == grpc.StatusCode.UNAVAILABLE and self.attempt < claim.max_attempts:
                await asyncio.shield(self._retry(exc.message))
                return
            outcome = (FAILED, exc.code.value[0], exc.message)
        except Exception as exc:  # a bug, not a bad request: say so, keep serving
            log.exception("job %s failed", self.id)
            await asyncio.shield(self._discard())
            outcome = (FAILED, grpc.StatusCode.INTERNAL.value[0], internal_message("gateway", exc))
        state, code, message = outcome
        log.info("job %s %s (attempt %d) %s", self.id, gateway_pb2.JobState.Name(state), self.attempt, message)
        # the final state must land even though this task may have been cancelled
        await asyncio.shield(store.finish(self.id, self.worker.owner, self.run, state, code, message))

    async def _publish(self) -> None:
        """Every stage finished: publish what the job's persist stages staged (Stage.Finish),
        and report it. Until here nothing the job wrote is visible."""
        for artifact in await finish_job(self.stages, self.id, self.run, commit=True):
            event = gateway_pb2.JobEvent()
            event.artifact.CopyFrom(artifact)
            await self.emit(event)

    async def _discard(self) -> None:
        """The run failed, was cancelled or goes back to the queue: nothing it staged may appear."""
        try:
            await finish_job(self.stages, self.id, self.run, commit=False)
        except Exception:
            log.exception("job %s: discarding its staged files failed", self.id)

    async def _retry(self, reason: str) -> None:
        log.info("job %s: attempt %d failed (%s); queued again", self.id, self.attempt, reason)
        try:
            await self.emit(job_notice(
                f"attempt {self.attempt} of {self.claim.max_attempts} failed: {reason}; the job runs again from the start"
            ))
        except LeaseLost:
            return
        await self.store.requeue(self.id, self.worker.owner, self.run, counted=True)

    async def _hand_back(self) -> None:
        log.info("job %s: handed back to the queue (gateway stopping)", self.id)
        try:
            await self.emit(job_notice(
                f"the gateway {self.worker.gateway.gateway_id} is stopping: the job goes back to the queue "
                f"(attempt {self.attempt} does not count) and runs again from the start"
            ))
        except LeaseLost:
            return
        await self.store.requeue(self.id, self.worker.owner, self.run, counted=False)

    async def _plan(self) -> list[PlannedStage]:
        """The plan made at submission when this gateway took the request itself, else a new
        one (the services may have changed since; a job run again waits for them to be back
        first). Each stage hears which run this is (StageStart.attempt): persist-disk replaces
        the files an earlier run of the job wrote."""
        if self.run == 1:
            cached = self.worker.plans.take(self.id)
            if cached is not None:
                return cached
        else:
            await self._wait_for_families()
        return await plan_chain(self.request, self.worker.families, self.worker.settings, self.id, self.run)

    async def _wait_for_families(self) -> None:
        """A retry starts when its services are reachable again (a restarted service, another
        replica), for up to TILECHAIN_JOB_RETRY_WAIT_S, instead of failing at once."""
        families = [self.worker.families[f] for f in sorted(chain_families(parse_chain(self.request)))]
        wait = self.worker.gateway.retry_wait
        try:
            await asyncio.wait_for(asyncio.gather(*(f.channel.channel_ready() for f in families)), wait)
        except asyncio.TimeoutError:
            down = [f for f in families if f.channel.get_state() != grpc.ChannelConnectivity.READY]
            names = ", ".join(f"the {f.name} service at {f.address}" for f in down) or "a service"
            raise ChainError(grpc.StatusCode.UNAVAILABLE, f"{names}: not reachable within {wait:.0f}s") from None

    def _timeout(self) -> float | None:
        if not self.claim.deadline:
            return None
        left = self.claim.deadline - time.time()
        if left <= 0:
            raise ChainError(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the job could run")
        return left

    async def _emit_notices(self) -> None:
        """What planning found to tell (onnx-web params without effect), before any stage runs."""
        for stage in self.stages:
            for message in stage.notices:
                event = gateway_pb2.JobEvent()
                event.notice.CopyFrom(gateway_pb2.NoticeEvent(stage_index=stage.index, name=stage.name, message=message))
                await self.emit(event)

    async def _pipe(self) -> None:
        count = len(self.stages)
        timeout = self._timeout()
        queues: list[asyncio.Queue[bytes | None]] = [asyncio.Queue(QUEUE_TILES) for _ in range(count)]
        calls = [
            stage.family.process(self._feed(stage, queues[stage.index]), timeout=timeout)
            for stage in self.stages
        ]
        pumps = [
            asyncio.create_task(self._pump(stage, call, queues[stage.index + 1] if stage.index + 1 < count else None))
            for stage, call in zip(self.stages, calls)
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
            # The first failure is the cause; later ones are stages cut off by it.
            for task in pumps:
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for call in calls:
                call.cancel()
            for task in pumps:
                task.cancel()

    async def _feed(self, stage: PlannedStage, upstream: asyncio.Queue[bytes | None]) -> AsyncIterator[stage_pb2.StageInput | bytes]:
        transport_tile = self.request.transport_tile
        yield stage_pb2.StageInput(start=stage.start(self.id, transport_tile))
        for attached in stage.attachments:
            async for tile in attached.tiles(transport_tile):
                yield stage_pb2.StageInput(tile=tile)
        if stage.index > 0:
            # the previous stage's tile messages, as received: a serialised StageOutput tile
            # is a serialised StageInput tile (core/wire.py)
            while (tile := await upstream.get()) is not None:
                yield tile
        yield stage_pb2.StageInput(end=stage_pb2.InputEnd())

    async def _pump(self, stage: PlannedStage, call, downstream: asyncio.Queue[bytes | None] | None) -> None:
        """Read one stage's output: tiles go on to the next stage (and to watchers if asked),
        everything else becomes a job event."""
        canvases = {}
        return_tiles = self.request.return_tiles
        send_tiles = return_tiles == gateway_pb2.TILE_RETURN_ALL or (return_tiles == gateway_pb2.TILE_RETURN_FINAL and downstream is None)
        started = gateway_pb2.JobEvent()
        started.stage.CopyFrom(
            gateway_pb2.StageEvent(
                kind=gateway_pb2.StageEvent.KIND_STARTED, stage_index=stage.index, name=stage.name, type=stage.type, outputs=stage.outputs
            )
        )
        await self.emit(started)
        try:
            async for raw in call:
                if is_tile_message(raw):  # passed on unparsed, parsed only for the caller
                    if downstream is not None:
                        await downstream.put(raw)
                    if not send_tiles:
                        continue
                out = stage_pb2.StageOutput.FromString(raw)
                kind = out.WhichOneof("kind")
                event = gateway_pb2.JobEvent()
                if kind == "tile":
                    event.tile.CopyFrom(
                        gateway_pb2.TileEvent(stage_index=stage.index, name=stage.name, canvas=canvases[out.tile.canvas_id], tile=out.tile)
                    )
                elif kind == "canvas":
                    canvases[out.canvas.id] = out.canvas
                    continue
                elif kind == "progress":
                    event.progress.CopyFrom(gateway_pb2.StageProgress(stage_index=stage.index, name=stage.name, progress=out.progress))
                elif kind == "artifact":
                    event.artifact.CopyFrom(out.artifact)
                elif kind == "notice":
                    event.notice.CopyFrom(gateway_pb2.NoticeEvent(stage_index=stage.index, name=stage.name, message=out.notice.message))
                elif kind == "done":
                    event.stage.CopyFrom(
                        gateway_pb2.StageEvent(kind=gateway_pb2.StageEvent.KIND_FINISHED, stage_index=stage.index, name=stage.name, type=stage.type)
                    )
                await self.emit(event)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(stage, exc) from None
        if downstream is not None:
            await downstream.put(None)


class Worker:
    """Takes admitted jobs from the store while this gateway has room (TILECHAIN_GATEWAY_MAX_JOBS),
    runs each as a task, renews their leases, and stops those cancelled from any gateway."""

    def __init__(self, store: JobStore, families: dict[str, Family], settings: Settings, gateway: GatewaySettings) -> None:
        self.store = store
        self.families = families
        self.settings = settings
        self.gateway = gateway
        self.owner = f"{gateway.gateway_id}/{uuid.uuid4().hex[:8]}"  # this process, in the store
        self.plans = PlanCache()
        self.runs: dict[str, Run] = {}
        # cancels heard for jobs not (yet) running here: a cancel can overtake the claim's answer
        self.cancels_heard: OrderedDict[str, None] = OrderedDict()
        self.room = asyncio.Condition()
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.store.on_cancel(self.cancel_local)
        released = await self.store.release_previous(self.gateway.gateway_id, self.owner)
        if released:
            log.info("%d job(s) of this gateway's previous process go back to work", released)
        self.tasks = [asyncio.create_task(self._take_jobs()), asyncio.create_task(self._renew_leases())]

    def cancel_local(self, job_id: str) -> None:
        run = self.runs.get(job_id)
        if run is not None:
            run.stop("cancel")
            return
        self.cancels_heard[job_id] = None
        while len(self.cancels_heard) > 1024:
            self.cancels_heard.popitem(last=False)

    async def _take_jobs(self) -> None:
        poll = min(5.0, self.gateway.lease / 4)
        while True:
            async with self.room:
                await self.room.wait_for(lambda: len(self.runs) < self.gateway.max_jobs)
            try:
                claim = await self.store.claim(self.owner, wait=poll)
            except self.store.errors as exc:
                log.warning("taking a job: the job store: %s", exc)
                await asyncio.sleep(1.0)  # the store is down: try again, not in a tight loop
                continue
            if claim is not None:
                self._launch(claim)

    def _launch(self, claim: Claim) -> None:
        run = Run(claim, self)
        self.runs[claim.id] = run
        log.info("job %s: attempt %d of %d starts", claim.id, claim.attempt, claim.max_attempts)
        run.task = asyncio.create_task(self._execute(run))
        if claim.id in self.cancels_heard:
            del self.cancels_heard[claim.id]
            run.stop("cancel")

    async def _execute(self, run: Run) -> None:
        try:
            await run.execute()
        except Exception:
            log.exception("job %s: its run ended with an error", run.id)
        finally:
            self.runs.pop(run.id, None)
            async with self.room:
                self.room.notify_all()

    async def _renew_leases(self) -> None:
        beats = 0
        while True:
            await asyncio.sleep(self.gateway.lease / 3)  # a period: three renewals per lease
            try:
                verdicts = await self.store.renew(self.owner, {job_id: run.run for job_id, run in self.runs.items()})
                for job_id, verdict in verdicts.items():
                    run = self.runs.get(job_id)
                    if run is not None:
                        run.stop(verdict)
                beats += 1
                if beats % 3 == 0:
                    await self.store.maintain()
            except Exception as exc:  # the store is down: the next beat tries again
                log.warning("renewing leases: %s", exc)

    async def stop(self) -> None:
        """A stopping gateway takes no more jobs and hands the ones it runs back to the queue
        (not counted as attempts), for another gateway, or itself after a restart."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        runs = list(self.runs.values())
        for run in runs:
            run.stop("handback")
        await asyncio.gather(*(run.task for run in runs if run.task is not None), return_exceptions=True)
