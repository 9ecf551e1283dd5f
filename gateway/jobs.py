"""Jobs: a planned chain running across the services, and its events.

Stage N's output stream is piped into stage N+1's input stream tile by tile through a small
bounded queue, so the gateway never holds more than a few tiles per stage boundary and a slow
stage slows the ones before it instead of filling memory."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from typing import AsyncIterator

import grpc

from tilechain.services.core.codecs import split_tiles
from tilechain.v1 import gateway_pb2, stage_pb2

from .chain import ChainError, PlannedStage, rpc_error

log = logging.getLogger("tilechain.gateway")

QUEUE_TILES = 8          # tiles buffered between two stages
WATCHER_EVENTS = 64      # events buffered for one watcher before the job waits for it
FINISHED_JOBS_KEPT = 1000

FINAL_STATES = (gateway_pb2.JOB_STATE_SUCCEEDED, gateway_pb2.JOB_STATE_FAILED, gateway_pb2.JOB_STATE_CANCELLED)


class Job:
    def __init__(self, job_id: str, stages: list[PlannedStage], request: gateway_pb2.ChainRequest) -> None:
        self.id = job_id
        self.stages = stages
        self.return_tiles = request.return_tiles
        self.transport_tile = request.transport_tile
        self.status = gateway_pb2.JobStatus(
            job_id=job_id, state=gateway_pb2.JOB_STATE_QUEUED, stages_total=len(stages)
        )
        self.status.stages.total = len(stages)
        # each stage's latest progress by unit ("steps", "tiles"): the summary adds them up
        self.progress: dict[tuple[int, str], tuple[int, int]] = {}
        self.history: list[gateway_pb2.JobEvent] = []  # every event but tiles, for late watchers
        self.watchers: set[asyncio.Queue[gateway_pb2.JobEvent]] = set()
        self.task: asyncio.Task[None] | None = None
        self.timeout: float | None = None

    # --- events --------------------------------------------------------------------------

    async def emit(self, event: gateway_pb2.JobEvent) -> None:
        event.job_id = self.id
        if event.WhichOneof("kind") != "tile":
            self.history.append(event)
        for queue in list(self.watchers):
            await queue.put(event)

    async def watch(self) -> AsyncIterator[gateway_pb2.JobEvent]:
        """Past events, then live ones, until the final status."""
        queue: asyncio.Queue[gateway_pb2.JobEvent] = asyncio.Queue(WATCHER_EVENTS)
        backlog = list(self.history)
        self.watchers.add(queue)
        try:
            for event in backlog:
                yield event
                if event.WhichOneof("kind") == "status":
                    return
            while True:
                event = await queue.get()
                yield event
                if event.WhichOneof("kind") == "status":
                    return
        finally:
            self.watchers.discard(queue)

    # --- running -------------------------------------------------------------------------

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def _run(self) -> None:
        self.status.state = gateway_pb2.JOB_STATE_RUNNING
        try:
            await self._emit_notices()
            await self._pipe()
            self.status.state = gateway_pb2.JOB_STATE_SUCCEEDED
            self.status.stages.current = self.status.stages.total
        except asyncio.CancelledError:
            self.status.state = gateway_pb2.JOB_STATE_CANCELLED
            self.status.code = grpc.StatusCode.CANCELLED.value[0]
            self.status.message = "cancelled"
        except ChainError as exc:
            self._fail(exc.code, exc.message)
        except Exception as exc:  # a bug, not a bad request: say so, keep serving
            log.exception("job %s failed", self.id)
            self._fail(grpc.StatusCode.INTERNAL, f"gateway: {type(exc).__name__}: {exc}")
        log.info("job %s %s %s", self.id, gateway_pb2.JobState.Name(self.status.state), self.status.message)
        final = gateway_pb2.JobEvent()
        final.status.CopyFrom(self.status)
        # the final event must reach watchers even if this task was cancelled
        await asyncio.shield(self.emit(final))

    async def _emit_notices(self) -> None:
        """What planning found to tell (onnx-web params without effect), before any stage runs."""
        for stage in self.stages:
            for message in stage.notices:
                event = gateway_pb2.JobEvent()
                event.notice.CopyFrom(gateway_pb2.NoticeEvent(stage_index=stage.index, name=stage.name, message=message))
                await self.emit(event)

    def _count(self, stage_index: int, progress: stage_pb2.Progress) -> None:
        """Keep onnx-web's summary (JobStatus stages/steps/tiles) current."""
        self.progress[(stage_index, progress.unit)] = (progress.done, progress.total)
        for unit, counter in (("steps", self.status.steps), ("tiles", self.status.tiles)):
            counts = [v for (_, u), v in self.progress.items() if u == unit]
            counter.current = sum(done for done, _ in counts)
            counter.total = sum(total for _, total in counts)

    def _fail(self, code: grpc.StatusCode, message: str) -> None:
        self.status.state = gateway_pb2.JOB_STATE_FAILED
        self.status.code = code.value[0]
        self.status.message = message

    async def _pipe(self) -> None:
        count = len(self.stages)
        queues: list[asyncio.Queue[stage_pb2.Tile | None]] = [asyncio.Queue(QUEUE_TILES) for _ in range(count)]
        calls = [
            stage.family.stub.Process(self._feed(stage, queues[stage.index]), timeout=self.timeout)
            for stage in self.stages
        ]
        pumps = [
            asyncio.create_task(self._pump(stage, call, queues[stage.index + 1] if stage.index + 1 < count else None))
            for stage, call in zip(self.stages, calls)
        ]
        try:
            done, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
            # The first failure is the cause; later ones are stages cut off by it.
            for task in pumps:
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for call in calls:
                call.cancel()
            for task in pumps:
                task.cancel()

    async def _feed(self, stage: PlannedStage, upstream: asyncio.Queue[stage_pb2.Tile | None]) -> AsyncIterator[stage_pb2.StageInput]:
        yield stage_pb2.StageInput(start=stage.start(self.id, self.transport_tile))
        for attached in stage.attachments:
            for tile in split_tiles(attached.canvas.id, attached.pixels, self.transport_tile):
                yield stage_pb2.StageInput(tile=tile)
        if stage.index > 0:
            while (tile := await upstream.get()) is not None:
                yield stage_pb2.StageInput(tile=tile)
        yield stage_pb2.StageInput(end=stage_pb2.InputEnd())

    async def _pump(self, stage: PlannedStage, call, downstream: asyncio.Queue[stage_pb2.Tile | None] | None) -> None:
        """Read one stage's output: tiles go on to the next stage (and to the caller if asked),
        everything else becomes a job event."""
        canvases = {}
        send_tiles = self.return_tiles == gateway_pb2.TILE_RETURN_ALL or (
            self.return_tiles == gateway_pb2.TILE_RETURN_FINAL and downstream is None
        )
        started = gateway_pb2.JobEvent()
        started.stage.CopyFrom(
            gateway_pb2.StageEvent(
                kind=gateway_pb2.StageEvent.KIND_STARTED, stage_index=stage.index, name=stage.name, type=stage.type, outputs=stage.outputs
            )
        )
        await self.emit(started)
        try:
            async for out in call:
                kind = out.WhichOneof("kind")
                event = gateway_pb2.JobEvent()
                if kind == "tile":
                    if downstream is not None:
                        await downstream.put(out.tile)
                    if not send_tiles:
                        continue
                    event.tile.CopyFrom(
                        gateway_pb2.TileEvent(stage_index=stage.index, name=stage.name, canvas=canvases[out.tile.canvas_id], tile=out.tile)
                    )
                elif kind == "canvas":
                    canvases[out.canvas.id] = out.canvas
                    continue
                elif kind == "progress":
                    self._count(stage.index, out.progress)
                    event.progress.CopyFrom(gateway_pb2.StageProgress(stage_index=stage.index, name=stage.name, progress=out.progress))
                elif kind == "artifact":
                    self.status.artifacts.append(out.artifact)
                    event.artifact.CopyFrom(out.artifact)
                elif kind == "notice":
                    event.notice.CopyFrom(gateway_pb2.NoticeEvent(stage_index=stage.index, name=stage.name, message=out.notice.message))
                elif kind == "done":
                    self.status.stages_done += 1
                    self.status.stages.current = self.status.stages_done
                    event.stage.CopyFrom(
                        gateway_pb2.StageEvent(kind=gateway_pb2.StageEvent.KIND_FINISHED, stage_index=stage.index, name=stage.name, type=stage.type)
                    )
                await self.emit(event)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(stage, exc) from None
        if downstream is not None:
            await downstream.put(None)


class JobTable:
    def __init__(self) -> None:
        self.jobs: OrderedDict[str, Job] = OrderedDict()

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex[:12]

    def add(self, job: Job) -> None:
        self.jobs[job.id] = job
        while len(self.jobs) > FINISHED_JOBS_KEPT:
            oldest = next(iter(self.jobs.values()))
            if oldest.status.state not in FINAL_STATES:
                break
            self.jobs.popitem(last=False)

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)
