"""The streaming tile engine, shared by every stage.

Input transport tiles arrive in any partition and order. Each output canvas is cut into
processing tiles (the stage's max tile, overlap and order); a processing tile runs as soon as
the input pixels under it, halo included, have arrived, and each output transport tile is sent
as soon as every processing tile touching it is done. Whole-canvas stages run once their
source canvases are complete. Overlapping processing tiles are blended with feather weights.
"""

from __future__ import annotations

import asyncio
import heapq
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator

import grpc
import numpy as np

from tilechain.v1 import stage_pb2, tiles_pb2

from .codecs import canvas_layout, is_latent, tile_message, tile_rect, transport_edge
from .config import Settings
from .params import ParamError
from .stage import ROLE_NAMES, OutputPlan, Stage, StageError, TileWork
from .tiles import CanvasBuffer, Rect, TileError, feather_weights, plan_windows, transport_grid


def plan_outputs(stage: Stage, inputs: list[tiles_pb2.Canvas], settings: Settings) -> list[OutputPlan]:
    """The stage's output canvases for these inputs, numbered, and checked against the limits
    and against what the stage can take and make (latents only where it says so)."""
    for canvas in inputs:
        try:
            canvas_layout(canvas)
        except ValueError as exc:
            raise StageError(grpc.StatusCode.INVALID_ARGUMENT, f"{stage.label}: input {exc}") from None
    for role in stage.required_attachments:
        if not any(c.attached and c.role == ROLE_NAMES[role] for c in inputs):
            raise ParamError(role, f"needs an attached {role} (attach one to stage '{stage.name}')")
    outputs = stage.plan(inputs)
    for number, output in enumerate(outputs):
        canvas = output.canvas
        canvas.id = number
        if canvas.width == 0 or canvas.height == 0 or canvas.width * canvas.height > settings.max_pixels:
            param = stage.size_params[0] if stage.size_params else "size"
            raise ParamError(
                param,
                f"output canvas {canvas.width}x{canvas.height} is outside the limit of "
                f"{settings.max_pixels} pixels (TILECHAIN_MAX_PIXELS)",
            )
    accepts = stage.accepts_latent(outputs)
    for canvas in inputs:
        if is_latent(canvas) and canvas.latent.space != accepts:
            takes = f"latents of {accepts!r} only" if accepts else "pixels, not latents, here"
            raise StageError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{stage.label}: input canvas {canvas.id} holds latents of {canvas.latent.space!r}; the stage takes {takes}",
            )
    if stage.latent_output and not stage.emits_latent(outputs):
        raise StageError(grpc.StatusCode.INVALID_ARGUMENT, f"{stage.label}: cannot emit latents for these inputs and params (latent_output)")
    return outputs


@dataclass(order=True)
class _Job:
    """One processing tile (or one whole canvas) of one output."""

    rank: int
    output: int = field(compare=False)
    window: Rect = field(compare=False)
    needs: dict[str, tuple[int, Rect]] = field(compare=False)  # name -> (input canvas id, rect)
    touches: list[int] = field(compare=False, default_factory=list)  # transport tile indices
    ready: bool = field(compare=False, default=False)


class _Output:
    """Assembly state of one output canvas."""

    def __init__(self, plan: OutputPlan, edge: int, blend: bool) -> None:
        canvas = plan.canvas
        self.plan = plan
        self.chans, dtype = canvas_layout(canvas)
        self.pixels = np.zeros((canvas.height, canvas.width, self.chans), dtype=dtype)
        self.blend = blend
        if blend:
            self.acc = np.zeros((canvas.height, canvas.width, self.chans), dtype=np.float32)
            self.weight = np.zeros((canvas.height, canvas.width), dtype=np.float32)
        self.transport = transport_grid(canvas.width, canvas.height, transport_edge(edge, self.chans * dtype.itemsize))
        self.pending = [0] * len(self.transport)
        self.jobs_left = 0


class TileEngine:
    def __init__(
        self,
        stage: Stage,
        inputs: list[tiles_pb2.Canvas],
        outputs: list[OutputPlan],
        transport_tile: int,
    ) -> None:
        self.stage = stage
        self.inputs = {c.id: c for c in inputs}
        self._wake = asyncio.Event()  # set when a processing tile becomes ready or input ends
        self.tiles_processed = 0
        self.tiles_emitted = 0
        self.steps_run = 0  # denoising steps (or another finer unit) the stage reported
        self.stepped_jobs_done = 0  # processing tiles that reported steps
        overlap = 0 if stage.needs_whole_canvas else stage.overlap
        self.outputs = [_Output(plan, transport_tile, blend=overlap > 0) for plan in outputs]
        self.buffers: dict[int, CanvasBuffer] = {}
        for plan in outputs:
            for source in plan.sources.values():
                if source.id not in self.buffers:
                    self.buffers[source.id] = CanvasBuffer(source.width, source.height, *canvas_layout(source))
        self.jobs = self._plan_jobs(overlap)
        self.waiting: dict[int, list[_Job]] = {}
        self.ready: list[_Job] = []
        for job in self.jobs:
            for canvas_id, _ in job.needs.values():
                self.waiting.setdefault(canvas_id, []).append(job)
            if not job.needs:
                self._mark_ready(job)

    def _plan_jobs(self, overlap: int) -> list[_Job]:
        stage, jobs = self.stage, []
        for number, out in enumerate(self.outputs):
            canvas = out.plan.canvas
            for window in plan_windows(canvas.width, canvas.height, stage.tile_size(), overlap, stage.order):
                needs = {}
                for name, source in out.plan.sources.items():
                    if stage.needs_whole_canvas:
                        rect = Rect(0, 0, source.width, source.height)
                    else:
                        rect = stage.input_rect(window, name, source, canvas)
                        rect = rect.expand(0, source.width, source.height)  # clamp
                    needs[name] = (source.id, rect)
                job = _Job(len(jobs), number, window, needs)
                job.touches = [i for i, t in enumerate(out.transport) if t.intersects(window)]
                for i in job.touches:
                    out.pending[i] += 1
                out.jobs_left += 1
                jobs.append(job)
        return jobs

    # --- input ---------------------------------------------------------------------------

    def _mark_ready(self, job: _Job) -> None:
        job.ready = True
        heapq.heappush(self.ready, job)
        self._wake.set()

    def _accept(self, tile: tiles_pb2.Tile) -> None:
        if tile.canvas_id not in self.inputs:
            raise StageError(grpc.StatusCode.INVALID_ARGUMENT, f"tile for undeclared canvas id {tile.canvas_id}")
        buffer = self.buffers.get(tile.canvas_id)
        if buffer is None:
            return  # a canvas this stage does not read
        rect = tile_rect(tile)
        try:
            buffer.add(rect, tile.pixels)
        except TileError as exc:
            raise StageError(grpc.StatusCode.INVALID_ARGUMENT, f"canvas {tile.canvas_id}: {exc}") from None
        for job in self.waiting.get(tile.canvas_id, ()):
            if job.ready or not any(cid == tile.canvas_id and r.intersects(rect) for cid, r in job.needs.values()):
                continue
            if all(self.buffers[cid].covers(r) for cid, r in job.needs.values()):
                self._mark_ready(job)

    async def _read(self, messages: AsyncIterator[stage_pb2.StageInput]) -> None:
        async for message in messages:
            kind = message.WhichOneof("kind")
            if kind == "tile":
                self._accept(message.tile)
            elif kind == "end":
                break
            else:
                raise StageError(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected '{kind}' message after the start")
        self._wake.set()

    # --- work ----------------------------------------------------------------------------

    def _compute(self, job: _Job) -> np.ndarray:
        stage, out = self.stage, self.outputs[job.output]
        stage.context.check_cancelled()
        if stage.needs_whole_canvas:
            sources = {name: self.buffers[cid].pixels for name, (cid, _) in job.needs.items()}
            result = stage.process_canvas(out.plan, sources)
        else:
            inputs = {
                name: (self.inputs[cid], r, self.buffers[cid].pixels[r.slices]) for name, (cid, r) in job.needs.items()
            }
            result = stage.process_tile(TileWork(out.plan.canvas, job.window, inputs))
        expected = (job.window.height, job.window.width, out.chans)
        if result.shape != expected or result.dtype != out.pixels.dtype:
            raise StageError(
                grpc.StatusCode.INTERNAL,
                f"stage {stage.type} returned {result.dtype} {result.shape} for a {expected} tile",
            )
        return result

    async def _compute_reporting_steps(self, job: _Job) -> AsyncIterator[np.ndarray | stage_pb2.StageOutput]:
        """Run one processing tile in a worker thread; while it runs, pass on the steps the
        stage reports (as progress in "steps" over the whole stage), then yield its result."""
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        context = self.stage.context

        def on_step(done: int, total: int) -> None:  # in the worker thread
            self.steps_run += 1
            loop.call_soon_threadsafe(steps.put_nowait, (done, total))

        context.on_step = on_step
        work = asyncio.ensure_future(asyncio.to_thread(self._compute, job))
        reported = False
        try:
            while True:
                getter = asyncio.ensure_future(steps.get())
                await asyncio.wait({work, getter}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                done, total = getter.result()
                reported = True
                yield self._step_progress(done, total)
            while not steps.empty():  # steps reported just before the tile finished
                done, total = steps.get_nowait()
                reported = True
                yield self._step_progress(done, total)
            if reported:
                self.stepped_jobs_done += 1
            yield work.result()
        finally:
            context.on_step = None
            if not work.done():
                context.cancel_event.set()  # the stream ended: stop the worker at its next step

    def _step_progress(self, done: int, total: int) -> stage_pb2.StageOutput:
        """Steps over the whole stage: those of the processing tiles before this one, plus
        this one's."""
        jobs = self.stage.jobs_with_steps(len(self.jobs))
        return stage_pb2.StageOutput(progress=stage_pb2.Progress(
            unit="steps", done=self.stepped_jobs_done * total + done, total=jobs * total))

    def _commit(self, job: _Job, result: np.ndarray) -> Iterator[stage_pb2.StageOutput]:
        out = self.outputs[job.output]
        window = job.window
        if out.blend:
            canvas = out.plan.canvas
            weight = feather_weights(window, canvas.width, canvas.height, self.stage.overlap)
            out.acc[window.slices] += result * weight[:, :, None]
            out.weight[window.slices] += weight
        else:
            out.pixels[window.slices] = result
        self.tiles_processed += 1
        out.jobs_left -= 1
        for i in job.touches:
            out.pending[i] -= 1
            if out.pending[i] == 0:
                rect = out.transport[i]
                if out.blend:
                    blended = out.acc[rect.slices] / out.weight[rect.slices][:, :, None]
                    if out.pixels.dtype == np.uint8:
                        blended = np.clip(np.rint(blended), 0, 255)
                    out.pixels[rect.slices] = blended
                self.tiles_emitted += 1
                yield stage_pb2.StageOutput(tile=tile_message(out.plan.canvas.id, rect, out.pixels))
        yield stage_pb2.StageOutput(
            progress=stage_pb2.Progress(unit="tiles", done=self.tiles_processed, total=len(self.jobs))
        )

    async def run(self, messages: AsyncIterator[stage_pb2.StageInput]) -> AsyncIterator[stage_pb2.StageOutput]:
        for out in self.outputs:
            yield stage_pb2.StageOutput(canvas=out.plan.canvas)
        reader = asyncio.create_task(self._read(messages))
        try:
            remaining = len(self.jobs)
            while remaining:
                if reader.done() and reader.exception() is not None:
                    raise reader.exception()  # type: ignore[misc]
                if not self.ready:
                    if reader.done():
                        raise StageError(grpc.StatusCode.INVALID_ARGUMENT, self._incomplete_input())
                    self._wake.clear()
                    waiter = asyncio.ensure_future(self._wake.wait())
                    await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    continue
                job = heapq.heappop(self.ready)
                result = None
                async for message in self._compute_reporting_steps(job):
                    if isinstance(message, np.ndarray):
                        result = message
                    else:
                        yield message
                for message in self._commit(job, result):
                    yield message
                remaining -= 1
                out = self.outputs[job.output]
                if out.jobs_left == 0:
                    if self.stage.keeps_output:
                        for artifact in await asyncio.to_thread(self.stage.finish, out.plan, out.pixels):
                            yield stage_pb2.StageOutput(artifact=artifact)
                    out.acc = out.weight = None  # type: ignore[assignment]
            await reader  # drain input this stage did not need, so the sender never blocks
            for notice in self.stage.context.notices:
                yield stage_pb2.StageOutput(notice=stage_pb2.Notice(message=notice))
            yield stage_pb2.StageOutput(
                done=stage_pb2.StageDone(tiles_processed=self.tiles_processed, tiles_emitted=self.tiles_emitted)
            )
        finally:
            reader.cancel()

    def _incomplete_input(self) -> str:
        missing = sorted(
            {cid for job in self.jobs if not job.ready for cid, r in job.needs.values() if not self.buffers[cid].covers(r)}
        )
        return f"input ended before input canvas(es) {missing} were complete"
