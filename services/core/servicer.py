"""The one servicer every stage family runs: Process (the tile engine), Describe, Plan, Stats.

Creating and planning a stage can load a model (seconds to minutes, cold): it runs in a worker
thread, so the service's event loop keeps serving every other stream meanwhile."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import AsyncIterator

import grpc

from tilechain.v1 import stage_pb2, stage_pb2_grpc

from .config import Settings, transport_tile_problem
from .engine import TileEngine, plan_outputs
from .errors import abort_unless_gone, internal_message, public_text
from .models import ModelRegistry, stay_offline_unless_allowed
from .params import ParamError, struct_to_dict
from .stage import SERVICE_COUNTERS, Cancelled, Context, OutputPlan, Stage, StageError, load_family, stage_label
from .wire import parse_stage_input, serialize

log = logging.getLogger("tilechain.stage")


def param_message(name: str, stage_type: str, error: ParamError) -> str:
    """The one wording of a bad-param error, shared by the services and the gateway."""
    return f"{stage_label(name, stage_type)}: param '{error.param}': {error.message}"


class PreloadError(Exception):
    """A model in the preload list that no stage of any family can load."""


class StageServicer(stage_pb2_grpc.StageServicer):
    def __init__(self, family: str, settings: Settings) -> None:
        self.family = family
        self.settings = settings
        self.stages = load_family(family)
        stay_offline_unless_allowed()
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

    def _plan(self, start: stage_pb2.StageStart, context: Context) -> tuple[Stage, list[OutputPlan]]:
        """Create and plan a stage (in a worker thread: it may load a model)."""
        stage = self._create(start, context)
        return stage, plan_outputs(stage, list(start.inputs), self.settings, start.transport_tile)

    def _plan_result(self, start: stage_pb2.StageStart) -> stage_pb2.PlanResult:
        stage, outputs = self._plan(start, Context(start.job_id, self.settings, self.models, attempt=start.attempt or 1))
        return stage_pb2.PlanResult(
            outputs=[o.canvas for o in outputs],
            # may read the model's VAE files (to name its latent space): in the thread too
            emits_latent=stage.emits_latent(outputs),
            accepts_latent=stage.accepts_latent(outputs),
        )

    # --- preloading --------------------------------------------------------------------------

    def preload(self, names: list[str]) -> list[str]:
        """Load the listed models that this family's stages take, as their first request would
        (blocking; called in a worker thread before the service reports SERVING). An entry is a
        model name, loaded by every stage of the family that takes it, or TYPE:NAME, loaded by
        that stage type only. Returns what was loaded; PreloadError for a name models.yaml does
        not know (a typo should not pass silently)."""
        loaded = []
        for entry in names:
            stage_type, _, name = entry.rpartition(":")
            if not self.models.knows(name):
                raise PreloadError(f"preload: unknown model {name!r} (not in models.yaml, not a file under the models root)")
            for cls in self.stages.values():
                if (stage_type and cls.type != stage_type) or cls.unavailable():
                    continue
                try:
                    if cls.preload(self.models, name):
                        loaded.append(f"{cls.type}:{name}")
                except ParamError as exc:
                    raise PreloadError(f"preload {entry!r}: {stage_label('preload', cls.type)}: param '{exc.param}': {exc.message}") from None
        return loaded

    # --- RPCs --------------------------------------------------------------------------------

    async def Describe(self, request: stage_pb2.DescribeRequest, context: grpc.aio.ServicerContext) -> stage_pb2.StageCatalog:
        return stage_pb2.StageCatalog(family=self.family, stages=[cls.spec() for cls in self.stages.values()])

    async def Plan(self, request: stage_pb2.StageStart, context: grpc.aio.ServicerContext) -> stage_pb2.PlanResult:
        try:
            return await asyncio.to_thread(self._plan_result, request)
        except ParamError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, self.public(param_message(request.name, request.type, exc)))
        except StageError as exc:
            await context.abort(exc.code, self.public(exc.message))
        except Exception as exc:  # a bug, not a bad request: say where, log the rest
            log.exception("job %s: planning %s failed", request.job_id, stage_label(request.name, request.type))
            await context.abort(grpc.StatusCode.INTERNAL, self.internal(request, exc))
        raise AssertionError("unreachable: abort raises")

    async def Stats(self, request: stage_pb2.StatsRequest, context: grpc.aio.ServicerContext) -> stage_pb2.ServiceStats:
        if request.wait_idle:
            async with self._idle:
                await self._idle.wait_for(lambda: self.stats.active_streams == 0)
        self.stats.vae_decodes = SERVICE_COUNTERS["vae_decodes"]
        self.stats.vae_encodes = SERVICE_COUNTERS["vae_encodes"]
        answer = stage_pb2.ServiceStats()
        answer.CopyFrom(self.stats)
        if request.reset_peaks:
            self.stats.peak_input_bytes = self.stats.peak_output_bytes = self.stats.peak_ready_tiles = 0
            self.stats.peak_active_streams = self.stats.active_streams
        return answer

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

    def _record(self, engine: TileEngine) -> None:
        stats = self.stats
        stats.tiles_processed += engine.tiles_processed
        stats.steps_run += engine.steps_run
        stats.peak_input_bytes = max(stats.peak_input_bytes, engine.peak_input)
        stats.peak_output_bytes = max(stats.peak_output_bytes, engine.peak_output)
        stats.peak_ready_tiles = max(stats.peak_ready_tiles, engine.peak_ready)

    async def Process(
        self, request_iterator: AsyncIterator[stage_pb2.StageInput], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[stage_pb2.StageOutput | bytes]:
        messages = request_iterator.__aiter__()
        self.stats.streams_started += 1
        await self._set_active(+1)
        start = stage_pb2.StageStart()
        run_context = Context("", self.settings, self.models)
        outcome = "failed"
        counted_job: str | None = None
        try:
            first = await anext(messages, None)
            if not isinstance(first, stage_pb2.StageInput) or first.WhichOneof("kind") != "start":
                raise StageError(grpc.StatusCode.INVALID_ARGUMENT, "a Process stream must begin with a start message")
            start = first.start
            run_context.job_id, run_context.attempt = start.job_id, start.attempt or 1
            counted_job = start.job_id
            await self._count_job_stream(counted_job, +1)  # Finish for this job waits for this stream
            problem = transport_tile_problem(start.transport_tile)
            if problem:
                raise StageError(grpc.StatusCode.INVALID_ARGUMENT, f"{stage_label(start.name, start.type)}: transport_tile: {problem}")
            stage, outputs = await asyncio.to_thread(self._plan, start, run_context)
            engine = TileEngine(stage, list(start.inputs), outputs, start.transport_tile or self.settings.transport_tile)
            log.info("job %s: %s started", start.job_id, stage_label(start.name, start.type))
            try:
                async for message in engine.run(messages, encoded=True):
                    yield message
            finally:
                self._record(engine)
            outcome = "finished"
        except (asyncio.CancelledError, GeneratorExit, Cancelled):
            # GeneratorExit: the caller cancelled while this handler was suspended at a yield
            outcome = "cancelled"
            raise
        except Exception as exc:
            if isinstance(exc, grpc.aio.AbortError):
                raise
            if context.cancelled():
                # the caller went away first: its input stream ended early, which is what the
                # stage reports; there is no one to answer, and nothing failed
                outcome = "cancelled"
                return
            if isinstance(exc, ParamError):
                code, message = grpc.StatusCode.INVALID_ARGUMENT, self.public(param_message(start.name, start.type, exc))
            elif isinstance(exc, StageError):
                code, message = exc.code, self.public(exc.message)
            else:
                log.exception("job %s: %s failed", start.job_id, stage_label(start.name, start.type))
                code, message = grpc.StatusCode.INTERNAL, self.internal(start, exc)
            await abort_unless_gone(context, code, message)
            outcome = "cancelled"  # returned: the caller had gone while the error was raised
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


def add_stage_servicer(servicer: StageServicer, server: grpc.aio.Server) -> str:
    """Register the servicer as the generated add_StageServicer_to_server does, except that
    Process reads and writes transport tiles through core/wire.py (no protobuf copies of the
    pixels). Returns the service's full name."""
    name = stage_pb2.DESCRIPTOR.services_by_name["Stage"].full_name

    def unary(method, request, response) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(method, request_deserializer=request.FromString, response_serializer=response.SerializeToString)

    handlers = {
        "Process": grpc.stream_stream_rpc_method_handler(servicer.Process, request_deserializer=parse_stage_input, response_serializer=serialize),
        "Describe": unary(servicer.Describe, stage_pb2.DescribeRequest, stage_pb2.StageCatalog),
        "Plan": unary(servicer.Plan, stage_pb2.StageStart, stage_pb2.PlanResult),
        "Stats": unary(servicer.Stats, stage_pb2.StatsRequest, stage_pb2.ServiceStats),
        "Finish": unary(servicer.Finish, stage_pb2.FinishRequest, stage_pb2.FinishResult),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)
    return name
