"""The one servicer every stage family runs: Process (the tile engine), Describe, Plan, Stats."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import AsyncIterator

import grpc

from tilechain.v1 import stage_pb2, stage_pb2_grpc

from .config import Settings, transport_tile_problem
from .engine import TileEngine, plan_outputs
from .errors import internal_message, public_text
from .params import ParamError, struct_to_dict
from .models import ModelRegistry
from .stage import SERVICE_COUNTERS, Cancelled, Context, Stage, StageError, load_family, stage_label

log = logging.getLogger("tilechain.stage")


def param_message(name: str, stage_type: str, error: ParamError) -> str:
    """The one wording of a bad-param error, shared by the services and the gateway."""
    return f"{stage_label(name, stage_type)}: param '{error.param}': {error.message}"


class StageServicer(stage_pb2_grpc.StageServicer):
    def __init__(self, family: str, settings: Settings) -> None:
        self.family = family
        self.settings = settings
        self.stages = load_family(family)
        for cls in self.stages.values():
            if not cls.unavailable():
                cls.prepare()
        self.models = ModelRegistry(settings.models_config, settings.models_root)
        self.stats = stage_pb2.ServiceStats()
        self._idle = asyncio.Condition()  # notified whenever a stream starts or ends
        self._job_streams: Counter[str] = Counter()  # streams running per job id
        for hook in self._hooks("start_up"):
            hook(settings)

    def _hooks(self, name: str) -> list:
        """A class hook of the family's stages, each implementation once."""
        seen: dict = {}
        for cls in self.stages.values():
            method = getattr(cls, name)
            seen.setdefault(method.__func__, method)
        return list(seen.values())

    def public(self, message: str) -> str:
        return public_text(message, [self.settings.output_root, self.settings.models_root])

    def internal(self, start: stage_pb2.StageStart, exc: BaseException) -> str:
        return internal_message(stage_label(start.name, start.type), exc, [self.settings.output_root, self.settings.models_root])

    def _create(self, start: stage_pb2.StageStart, context: Context) -> Stage:
        cls = self.stages.get(start.type)
        if cls is None:
            served = ", ".join(sorted(self.stages)) or "none"
            raise StageError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{stage_label(start.name, start.type)}: unknown stage type for the {self.family} "
                f"service (it serves: {served})",
            )
        reason = cls.unavailable()
        if reason:
            raise StageError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{stage_label(start.name, start.type)}: the {self.family} service cannot run this stage: {reason}",
            )
        return cls.create(start.name, struct_to_dict(start.params), context, start.latent_output)

    async def Describe(self, request: stage_pb2.DescribeRequest, context: grpc.aio.ServicerContext) -> stage_pb2.StageCatalog:
        return stage_pb2.StageCatalog(family=self.family, stages=[cls.spec() for cls in self.stages.values()])

    async def Plan(self, request: stage_pb2.StageStart, context: grpc.aio.ServicerContext) -> stage_pb2.PlanResult:
        try:
            stage = self._create(request, Context(request.job_id, self.settings, self.models, attempt=request.attempt or 1))
            outputs = plan_outputs(stage, list(request.inputs), self.settings)
        except ParamError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, self.public(param_message(request.name, request.type, exc)))
        except StageError as exc:
            await context.abort(exc.code, self.public(exc.message))
        except Exception as exc:  # a bug, not a bad request: say where, log the rest
            log.exception("job %s: planning %s failed", request.job_id, stage_label(request.name, request.type))
            await context.abort(grpc.StatusCode.INTERNAL, self.internal(request, exc))
        return stage_pb2.PlanResult(
            outputs=[o.canvas for o in outputs], emits_latent=stage.emits_latent(outputs), accepts_latent=stage.accepts_latent(outputs)
        )

    async def Stats(self, request: stage_pb2.StatsRequest, context: grpc.aio.ServicerContext) -> stage_pb2.ServiceStats:
        if request.wait_idle:
            async with self._idle:
                await self._idle.wait_for(lambda: self.stats.active_streams == 0)
        self.stats.vae_decodes = SERVICE_COUNTERS["vae_decodes"]
        self.stats.vae_encodes = SERVICE_COUNTERS["vae_encodes"]
        return self.stats

    async def Finish(self, request: stage_pb2.FinishRequest, context: grpc.aio.ServicerContext) -> stage_pb2.FinishResult:
        """Publish or discard a job's staged files, once none of its streams runs here."""
        async with self._idle:
            await self._idle.wait_for(lambda: self._job_streams[request.job_id] == 0)
        artifacts = []
        try:
            for hook in self._hooks("finish_job"):
                artifacts += await asyncio.to_thread(hook, self.settings, request.job_id, request.attempt, request.commit)
        except StageError as exc:
            await context.abort(exc.code, self.public(exc.message))
        log.info("job %s: %s (attempt %d)", request.job_id, "published" if request.commit else "discarded", request.attempt)
        return stage_pb2.FinishResult(artifacts=artifacts)

    async def _set_active(self, delta: int) -> None:
        async with self._idle:
            self.stats.active_streams += delta
            self.stats.peak_active_streams = max(self.stats.peak_active_streams, self.stats.active_streams)
            self._idle.notify_all()

    async def _count_job_stream(self, job_id: str, delta: int) -> None:
        async with self._idle:
            self._job_streams[job_id] += delta
            if self._job_streams[job_id] <= 0:
                del self._job_streams[job_id]
            self._idle.notify_all()

    async def Process(
        self, request_iterator: AsyncIterator[stage_pb2.StageInput], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[stage_pb2.StageOutput]:
        messages = request_iterator.__aiter__()
        self.stats.streams_started += 1
        await self._set_active(+1)
        start = stage_pb2.StageStart()
        run_context = Context("", self.settings, self.models)
        outcome = "failed"
        counted_job: str | None = None
        try:
            first = await anext(messages, None)
            if first is None or first.WhichOneof("kind") != "start":
                raise StageError(grpc.StatusCode.INVALID_ARGUMENT, "a Process stream must begin with a start message")
            start = first.start
            run_context.job_id, run_context.attempt = start.job_id, start.attempt or 1
            counted_job = start.job_id
            await self._count_job_stream(counted_job, +1)  # Finish for this job waits for this stream
            problem = transport_tile_problem(start.transport_tile)
            if problem:
                raise StageError(grpc.StatusCode.INVALID_ARGUMENT, f"{stage_label(start.name, start.type)}: transport_tile: {problem}")
            stage = self._create(start, run_context)
            outputs = plan_outputs(stage, list(start.inputs), self.settings)
            engine = TileEngine(stage, list(start.inputs), outputs, start.transport_tile or self.settings.transport_tile)
            log.info("job %s: %s started", start.job_id, stage_label(start.name, start.type))
            try:
                async for message in engine.run(messages):
                    yield message
            finally:
                self.stats.tiles_processed += engine.tiles_processed
                self.stats.steps_run += engine.steps_run
            outcome = "finished"
        except ParamError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, self.public(param_message(start.name, start.type, exc)))
        except StageError as exc:
            await context.abort(exc.code, self.public(exc.message))
        except (asyncio.CancelledError, GeneratorExit, Cancelled):
            # GeneratorExit: the caller cancelled while this handler was suspended at a yield
            outcome = "cancelled"
            raise
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            log.exception("job %s: %s failed", start.job_id, stage_label(start.name, start.type))
            await context.abort(grpc.StatusCode.INTERNAL, self.internal(start, exc))
        finally:
            run_context.cancel_event.set()  # stops stage code still running in a worker thread
            if outcome == "finished":
                self.stats.streams_finished += 1
            elif outcome == "cancelled":
                self.stats.streams_cancelled += 1
            else:
                self.stats.streams_failed += 1
            log.info("job %s: %s %s", start.job_id, stage_label(start.name, start.type), outcome)
            if counted_job is not None:
                await self._count_job_stream(counted_job, -1)
            await self._set_active(-1)
