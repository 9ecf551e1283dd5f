"""The one servicer every stage family runs: Process (the tile engine), Describe, Plan, Stats."""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

import grpc

from tilechain.v1 import stage_pb2, stage_pb2_grpc

from .config import Settings
from .engine import TileEngine, plan_outputs
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
        self._idle = asyncio.Condition()

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
            stage = self._create(request, Context(request.job_id, self.settings, self.models))
            # in a thread: some plans ask the network (an S3 bucket, a URL's image header)
            outputs = await asyncio.to_thread(plan_outputs, stage, list(request.inputs), self.settings)
        except ParamError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, param_message(request.name, request.type, exc))
        except StageError as exc:
            await context.abort(exc.code, exc.message)
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

    async def _set_active(self, delta: int) -> None:
        async with self._idle:
            self.stats.active_streams += delta
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
        try:
            first = await anext(messages, None)
            if first is None or first.WhichOneof("kind") != "start":
                raise StageError(grpc.StatusCode.INVALID_ARGUMENT, "a Process stream must begin with a start message")
            start = first.start
            run_context.job_id = start.job_id
            stage = self._create(start, run_context)
            outputs = await asyncio.to_thread(plan_outputs, stage, list(start.inputs), self.settings)
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
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, param_message(start.name, start.type, exc))
        except StageError as exc:
            await context.abort(exc.code, exc.message)
        except (asyncio.CancelledError, GeneratorExit, Cancelled):
            # GeneratorExit: the caller cancelled while this handler was suspended at a yield
            outcome = "cancelled"
            raise
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            log.exception("job %s: %s failed", start.job_id, stage_label(start.name, start.type))
            await context.abort(
                grpc.StatusCode.INTERNAL, f"{stage_label(start.name, start.type)}: {type(exc).__name__}: {exc}"
            )
        finally:
            run_context.cancel_event.set()  # stops stage code still running in a worker thread
            if outcome == "finished":
                self.stats.streams_finished += 1
            elif outcome == "cancelled":
                self.stats.streams_cancelled += 1
            else:
                self.stats.streams_failed += 1
            log.info("job %s: %s %s", start.job_id, stage_label(start.name, start.type), outcome)
            await self._set_active(-1)
