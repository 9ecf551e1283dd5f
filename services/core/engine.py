"""The streaming tile engine, shared by every stage.

Input transport tiles arrive in any partition and order. Each output canvas is cut into
processing tiles (the stage's max tile, overlap and order); a processing tile runs as soon as
the input pixels under it, halo included, have arrived, and each output transport tile is sent
as soon as every processing tile touching it is done. Whole-canvas stages run once their
source canvases are complete. Overlapping processing tiles are blended with feather weights.
Streaming stages (`Stage.streams`) take their input tiles one by one instead and give back
finished output regions.

Memory is bounded by the tiles in flight, not by the image (docs/design.md, "Engine memory"):
- an input tile is kept, as the received bytes, only while a processing tile still to run
  reads it; whole canvases are assembled only for whole-canvas stages;
- output pixels exist only for transport tiles not yet sent: a processing tile's result goes
  straight into the tiles it touches (feather accumulators for blending stages, allocated on
  first touch), and a tile is freed once sent;
- an output the stage keeps (persist writes its images; Stage.keeps) is assembled from its
  sent tiles only a band of rows at a time, each band given to the stage as soon as it is
  complete, top to bottom; only a stage that asks for whole canvases (persist's JPEG and WebP)
  gets one;
- backpressure: while MAX_READY processing tiles have their input and wait to run, the engine
  reads no further input, so a slow stage holds back its input stream (gRPC flow control
  then slows the gateway and the stage before it).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

import grpc
import numpy as np

from tilechain.v1 import stage_pb2, tiles_pb2

from .codecs import canvas_layout, is_latent, transport_edge
from .config import Settings
from .params import ParamError
from .stage import KEEP_ROWS, ROLE_NAMES, OutputPlan, Stage, StageError, TileWork
from .tiles import Rect, Rows, TileError, feather_weights
from .wire import TileView, encode_tile

log = logging.getLogger("tilechain.engine")

MAX_READY = 2  # processing tiles with all their input, waiting to run, before the engine stops reading
CELL = 256     # edge of the buckets of the spatial indexes


def plan_outputs(stage: Stage, inputs: list[tiles_pb2.Canvas], settings: Settings, transport_tile: int = 0) -> list[OutputPlan]:
    """The stage's output canvases for these inputs, numbered, each with the grid its transport
    tiles will be cut on, and checked against the limits and against what the stage can take
    and make (latents only where it says so). transport_tile: the job's (0: the settings')."""
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
    for output in outputs:
        output.canvas.grid.CopyFrom(output_grid(stage, output, transport_tile or settings.transport_tile))
    return outputs


def output_grid(stage: Stage, output: OutputPlan, transport_tile: int) -> tiles_pb2.TileGrid:
    """The transport grid of an output: rows shifted so that each lies within what the rows
    of the input received so far can make.

    Input tiles arrive row by row. An output row that needs a few rows of the next input row
    (a resize's halo) cannot be made until that row comes, so the rows above it in the input
    would wait too: a band as wide as the image. So the output's rows end where the rows
    computable from whole input rows end (found by asking the stage's input_rect), and only a
    halo's rows wait; for stages whose result does not depend on the cut (Stage.exact_tiles).
    Stages that pass tiles through take their input's grid; the others, and stages that blend
    overlapping processing tiles, keep the plain grid."""
    canvas = output.canvas
    chans, dtype = canvas_layout(canvas)
    edge = transport_edge(transport_tile, chans * dtype.itemsize)
    grid = tiles_pb2.TileGrid(edge=edge)
    if not output.sources or stage.needs_whole_canvas:
        return grid
    name = "image" if "image" in output.sources else next(iter(output.sources))
    source = output.sources[name]
    if source.grid.edge:
        in_rows = Rows(source.grid.edge, source.grid.row_shift, source.height)
    else:  # no hint (an attachment): cut as this service would cut it
        in_chans, in_dtype = canvas_layout(source)
        in_rows = Rows(transport_edge(transport_tile, in_chans * in_dtype.itemsize), 0, source.height)
    if stage.streams:
        if source.height == canvas.height and in_rows.edge == edge:
            grid.row_shift = in_rows.shift  # a pass-through: emit the rows as received
        return grid
    if stage.overlap or not stage.exact_tiles:
        return grid  # where tiles are cut shows in the result: cut them as always

    def last_row_within(y: int) -> int:
        """The most output rows (from the top) that need no input row at or below y."""
        low, high = 0, canvas.height
        while low < high:
            middle = (low + high + 1) // 2
            need = stage.input_rect(Rect(0, middle - 1, canvas.width, 1), name, source, canvas)
            if need.expand(0, source.width, source.height).y1 <= y:
                low = middle
            else:
                high = middle - 1
        return low

    # two input row edges in the middle (away from the clamping at the canvas's borders): the
    # output rows ending there are a whole number of output rows apart, or no shift serves both
    middle = in_rows.of(source.height // 2)
    ends = [last_row_within(in_rows.top(row)) for row in (middle, middle + 1) if 0 < in_rows.top(row) < source.height]
    if len(ends) == 2 and 0 < ends[0] < ends[1] < canvas.height and (ends[1] - ends[0]) % edge == 0:
        grid.row_shift = -ends[0] % edge
    return grid


class _Cells:
    """Keys of rects by the CELL x CELL buckets their rects touch: which rects a rect may meet."""

    def __init__(self) -> None:
        self.cells: dict[tuple[int, int], dict[Any, Rect]] = {}

    @staticmethod
    def _keys(rect: Rect) -> Iterator[tuple[int, int]]:
        for cy in range(rect.y // CELL, (rect.y1 - 1) // CELL + 1):
            for cx in range(rect.x // CELL, (rect.x1 - 1) // CELL + 1):
                yield cx, cy

    def add(self, key: Any, rect: Rect) -> None:
        for cell in self._keys(rect):
            self.cells.setdefault(cell, {})[key] = rect

    def remove(self, key: Any, rect: Rect) -> None:
        for cell in self._keys(rect):
            bucket = self.cells.get(cell)
            if bucket is not None:
                bucket.pop(key, None)
                if not bucket:
                    del self.cells[cell]

    def meeting(self, rect: Rect) -> dict[Any, Rect]:
        """The stored keys whose rects intersect rect."""
        found: dict[Any, Rect] = {}
        for cell in self._keys(rect):
            for key, other in self.cells.get(cell, {}).items():
                if key not in found and other.intersects(rect):
                    found[key] = other
        return found


@dataclass
class _Block:
    pixels: np.ndarray  # (h, w, c), usually a view of the received message's bytes
    uses: int           # processing tiles still to run that read it


class _Input:
    """One input canvas as its tiles arrive: the rects received (to refuse overlaps) and the
    pixels still to be read, as blocks, or assembled whole for whole-canvas stages."""

    def __init__(self, canvas: tiles_pb2.Canvas, whole: bool) -> None:
        self.canvas = canvas
        self.chans, self.dtype = canvas_layout(canvas)
        self.whole = whole
        self.received = _Cells()
        self.count = 0
        self.blocks: dict[int, _Block] = {}
        self.block_cells = _Cells()
        self.block_count = 0
        self.dense: np.ndarray | None = None
        self.readers = 0  # processing tiles that read this canvas and have not taken their pixels

    def check(self, rect: Rect, data: Any) -> np.ndarray:
        """The tile's pixels as an (h, w, c) array (a view of data); TileError if it does not fit."""
        canvas = self.canvas
        if rect.width == 0 or rect.height == 0 or rect.x1 > canvas.width or rect.y1 > canvas.height:
            raise TileError(
                f"tile {rect.width}x{rect.height} at ({rect.x},{rect.y}) lies outside the "
                f"{canvas.width}x{canvas.height} canvas"
            )
        expected = rect.area * self.chans * self.dtype.itemsize
        if len(data) != expected:
            raise TileError(
                f"tile {rect.width}x{rect.height} at ({rect.x},{rect.y}) has {len(data)} bytes, "
                f"expected {expected} ({self.chans} channels of {self.dtype.itemsize} byte(s))"
            )
        if self.received.meeting(rect):
            raise TileError(f"tile at ({rect.x},{rect.y}) overlaps a tile already received")
        self.received.add(self.count, rect)
        self.count += 1
        return np.frombuffer(data, dtype=self.dtype).reshape(rect.height, rect.width, self.chans)

    def covered(self, rect: Rect) -> bool:
        return sum(r.intersection(rect).area for r in self.received.meeting(rect).values()) == rect.area  # type: ignore[union-attr]


@dataclass(order=True)
class _Job:
    """One processing tile (or one whole canvas) of one output."""

    rank: int
    output: int = field(compare=False)
    window: Rect = field(compare=False)
    needs: dict[str, tuple[int, Rect]] = field(compare=False)  # name -> (input canvas id, rect)
    missing: int = field(compare=False, default=0)              # input pixels not yet arrived
    ready: bool = field(compare=False, default=False)


class _Output:
    """One output canvas: its transport tiles (on its grid), the pixels of those not yet sent,
    and how much work each still waits for (processing tiles, or pixels for streaming stages)."""

    def __init__(self, plan: OutputPlan, edge: int, blend: bool) -> None:
        canvas = plan.canvas
        self.plan = plan
        self.id = canvas.id
        self.width, self.height = canvas.width, canvas.height
        self.chans, self.dtype = canvas_layout(canvas)
        self.blend = blend
        self.edge = transport_edge(edge, self.chans * self.dtype.itemsize)
        shift = canvas.grid.row_shift if canvas.grid.edge == self.edge and canvas.grid.row_shift < self.edge else 0
        canvas.grid.CopyFrom(tiles_pb2.TileGrid(edge=self.edge, row_shift=shift))  # as it is cut
        self.grid_rows = Rows(self.edge, shift, self.height)
        self.cols = -(-canvas.width // self.edge)
        self.rows = self.grid_rows.count
        self.pending = [0] * (self.cols * self.rows)
        self.partial: dict[int, np.ndarray] = {}                   # tile -> pixels assembled so far
        self.sums: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # tile -> (weighted sum, weight) when blending
        self.jobs_left = 0
        self.tiles_left = len(self.pending)

    def row_rect(self, row: int) -> Rect:
        top = self.grid_rows.top(row)
        return Rect(0, top, self.width, self.grid_rows.top(row + 1) - top)

    def rect(self, i: int) -> Rect:
        row, col = divmod(i, self.cols)
        x, band = col * self.edge, self.row_rect(row)
        return Rect(x, band.y, min(self.edge, self.width - x), band.height)

    def touching(self, window: Rect) -> list[int]:
        cols = range(window.x // self.edge, (window.x1 - 1) // self.edge + 1)
        return [row * self.cols + col for row in self.grid_rows.span(window.y, window.y1) for col in cols]


class _Kept:
    """An output the stage keeps, assembled from its sent tiles in bands of rows: one row of
    transport tiles per band (KEEP_ROWS) or the whole canvas as one band (KEEP_CANVAS). A band
    is allocated when its first tile arrives and given away, in order, once complete; so what
    is held is the bands from the first incomplete one to the lowest tile received."""

    def __init__(self, out: _Output, mode: str) -> None:
        self.out = out
        self.rows = mode == KEEP_ROWS
        self.count = out.rows if self.rows else 1
        self.bands: dict[int, np.ndarray] = {}  # band number -> pixels
        self.missing: dict[int, int] = {}       # band number -> pixels not yet placed in it
        self.next = 0                           # the next band to give

    def _band(self, number: int) -> Rect:
        return self.out.row_rect(number) if self.rows else Rect(0, 0, self.out.width, self.out.height)

    def put(self, rect: Rect, pixels: np.ndarray) -> int:
        """Place a sent tile; the bytes of the bands this allocated."""
        allocated = 0
        out = self.out
        for number in out.grid_rows.span(rect.y, rect.y1) if self.rows else (0,):
            band_rect = self._band(number)
            band = self.bands.get(number)
            if band is None:
                band = self.bands[number] = np.empty((band_rect.height, out.width, out.chans), dtype=out.dtype)
                self.missing[number] = band_rect.area
                allocated += band.nbytes
            part = band_rect.intersection(rect)
            band[part.relative_to(band_rect).slices] = pixels[part.relative_to(rect).slices]  # type: ignore[union-attr]
            self.missing[number] -= part.area  # type: ignore[union-attr]
        return allocated

    def complete(self) -> Iterator[tuple[int, np.ndarray]]:
        """The complete bands not yet given, top to bottom, as (first row, pixels)."""
        while self.missing.get(self.next) == 0:
            del self.missing[self.next]
            yield self._band(self.next).y, self.bands.pop(self.next)
            self.next += 1

    @property
    def done(self) -> bool:
        return self.next >= self.count


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
        self._room = asyncio.Event()  # set when a ready processing tile is taken: the reader may go on
        self.tiles_processed = 0
        self.tiles_emitted = 0
        self.steps_run = 0  # denoising steps (or another finer unit) the stage reported
        self.stepped_jobs_done = 0  # processing tiles that reported steps
        self.held_input = self.peak_input = 0    # bytes of input pixels kept
        self.held_output = self.peak_output = 0  # bytes of output pixels (and blend sums) not yet sent
        self.peak_ready = 0  # most processing tiles holding their input while waiting to run
        whole = stage.needs_whole_canvas
        overlap = 0 if whole else stage.overlap
        self.outputs = [_Output(plan, transport_tile, blend=overlap > 0 and not stage.streams) for plan in outputs]
        self.kept = {out.id: _Kept(out, mode) for out in self.outputs if (mode := stage.keeps(out.plan))}  # until finished
        self.sources: dict[int, _Input] = {}
        for plan in outputs:
            for source in plan.sources.values():
                if source.id not in self.sources:
                    self.sources[source.id] = _Input(source, whole)
        self.jobs: list[_Job] = [] if stage.streams else self._plan_jobs(overlap)
        self.waiting: dict[int, _Cells] = {cid: _Cells() for cid in self.sources}  # canvas -> jobs by need rect
        self.ready: list[_Job] = []
        for job in self.jobs:
            job.missing = sum(rect.area for _, rect in job.needs.values())
            for name, (cid, rect) in job.needs.items():
                self.waiting[cid].add((job.rank, name), rect)
                self.sources[cid].readers += 1
            if not job.needs:
                self._mark_ready(job)

    def _plan_jobs(self, overlap: int) -> list[_Job]:
        """The processing tiles, ranked window by window across the outputs (the variants of one
        input image read the same input: run together, they let it go together, and a batched
        call's images for the other variants are taken at once)."""
        stage, planned = self.stage, []
        for number, out in enumerate(self.outputs):
            canvas = out.plan.canvas
            for order, window in enumerate(stage.windows(canvas, overlap, out.grid_rows.shift)):
                needs = {}
                for name, source in out.plan.sources.items():
                    if stage.needs_whole_canvas:
                        rect = Rect(0, 0, source.width, source.height)
                    else:
                        rect = stage.input_rect(window, name, source, canvas)
                        rect = rect.expand(0, source.width, source.height)  # clamp
                    needs[name] = (source.id, rect)
                for i in out.touching(window):
                    out.pending[i] += 1
                out.jobs_left += 1
                planned.append((order, number, window, needs))
        planned.sort(key=lambda p: (p[0], p[1]))
        return [_Job(rank, number, window, needs) for rank, (_, number, window, needs) in enumerate(planned)]

    # --- memory accounting -----------------------------------------------------------------

    def _count_input(self, nbytes: int) -> None:
        self.held_input += nbytes
        self.peak_input = max(self.peak_input, self.held_input)

    def _count_output(self, nbytes: int) -> None:
        self.held_output += nbytes
        self.peak_output = max(self.peak_output, self.held_output)

    # --- input -----------------------------------------------------------------------------

    def _mark_ready(self, job: _Job) -> None:
        job.ready = True
        heapq.heappush(self.ready, job)
        if job.needs:
            self.peak_ready = max(self.peak_ready, sum(1 for j in self.ready if j.needs))
        self._wake.set()

    @staticmethod
    def _tile_of(message: Any) -> TileView | None:
        """The tile of an input message (None for the end); StageError for anything else."""
        if isinstance(message, TileView):
            return message
        kind = message.WhichOneof("kind")
        if kind == "tile":
            return TileView.of(message.tile)
        if kind == "end":
            return None
        raise StageError(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected '{kind}' message after the start")

    def _check(self, tile: TileView) -> tuple[_Input, np.ndarray] | None:
        """The tile's canvas and pixels, None for a canvas this stage does not read."""
        if tile.canvas_id not in self.inputs:
            raise StageError(grpc.StatusCode.INVALID_ARGUMENT, f"tile for undeclared canvas id {tile.canvas_id}")
        source = self.sources.get(tile.canvas_id)
        if source is None:
            return None
        try:
            return source, source.check(tile.rect, tile.pixels)
        except TileError as exc:
            raise StageError(grpc.StatusCode.INVALID_ARGUMENT, f"canvas {tile.canvas_id}: {exc}") from None

    def _accept(self, tile: TileView) -> None:
        checked = self._check(tile)
        if checked is None:
            return
        source, pixels = checked
        rect = tile.rect
        needs = []
        waiting = self.waiting[tile.canvas_id]
        for (rank, name), need in list(waiting.meeting(rect).items()):
            job = self.jobs[rank]
            needs.append(need)
            job.missing -= need.intersection(rect).area  # type: ignore[union-attr]
            if job.missing == 0:
                for other, (cid, other_rect) in job.needs.items():
                    self.waiting[cid].remove((rank, other), other_rect)
                self._mark_ready(job)
        if source.whole:
            if source.dense is None:
                source.dense = np.empty((source.canvas.height, source.canvas.width, source.chans), dtype=source.dtype)
                self._count_input(source.dense.nbytes)
            source.dense[rect.slices] = pixels
        elif any(need.y > rect.y or need.y1 < rect.y1 for need in needs):
            # some readers take only some of its rows (a halo, a band): keep it as bands cut
            # where those readers' rows begin and end, each let go when its own readers are
            # done; a band of the bottom halo stays, the rows above it go (copies, so that the
            # message can go)
            cuts = sorted({rect.y, rect.y1, *(y for need in needs for y in (need.y, need.y1) if rect.y < y < rect.y1)})
            for top, bottom in zip(cuts, cuts[1:]):
                band = Rect(rect.x, top, rect.width, bottom - top)
                uses = sum(1 for need in needs if need.intersects(band))
                if uses:
                    self._keep(source, band, pixels[top - rect.y : bottom - rect.y].copy(), uses)
        elif needs:
            self._keep(source, rect, pixels, len(needs))

    def _keep(self, source: _Input, rect: Rect, pixels: np.ndarray, uses: int) -> None:
        source.blocks[source.block_count] = _Block(pixels, uses)
        source.block_cells.add(source.block_count, rect)
        source.block_count += 1
        self._count_input(pixels.nbytes)

    def _take(self, job: _Job) -> dict[str, tuple[tiles_pb2.Canvas, Rect, np.ndarray]]:
        """The input pixels of a ready processing tile; blocks no other one reads are let go."""
        taken = {}
        for name, (cid, rect) in job.needs.items():
            source = self.sources[cid]
            source.readers -= 1
            if source.whole:
                pixels = source.dense
                if source.readers == 0:
                    self._count_input(-source.dense.nbytes)  # type: ignore[union-attr]
                    source.dense = None  # the whole-canvas stage holds it while it runs
                taken[name] = (source.canvas, rect, pixels[rect.slices])  # type: ignore[index]
                continue
            hits = source.block_cells.meeting(rect)
            if len(hits) == 1 and next(iter(hits.values())) == rect:
                pixels = source.blocks[next(iter(hits))].pixels
            else:
                pixels = np.empty((rect.height, rect.width, source.chans), dtype=source.dtype)
                for key, block_rect in hits.items():
                    inter = block_rect.intersection(rect)
                    pixels[inter.relative_to(rect).slices] = source.blocks[key].pixels[inter.relative_to(block_rect).slices]  # type: ignore[union-attr]
            for key, block_rect in hits.items():
                block = source.blocks[key]
                block.uses -= 1
                if block.uses == 0:
                    del source.blocks[key]
                    source.block_cells.remove(key, block_rect)
                    self._count_input(-block.pixels.nbytes)
            taken[name] = (source.canvas, rect, pixels)
        return taken

    async def _read(self, messages: AsyncIterator[Any]) -> None:
        async for message in messages:
            tile = self._tile_of(message)
            if tile is None:
                break
            self._accept(tile)
            while len(self.ready) >= MAX_READY:  # no room: let the input wait (backpressure)
                self._room.clear()
                await self._room.wait()
        self._wake.set()

    # --- work ------------------------------------------------------------------------------

    def _compute(self, job: _Job, inputs: dict[str, tuple[tiles_pb2.Canvas, Rect, np.ndarray]]) -> np.ndarray:
        stage, out = self.stage, self.outputs[job.output]
        stage.context.check_cancelled()
        if stage.needs_whole_canvas:
            result = stage.process_canvas(out.plan, {name: pixels for name, (_, _, pixels) in inputs.items()})
        else:
            result = stage.process_tile(TileWork(out.plan.canvas, job.window, inputs))
        expected = (job.window.height, job.window.width, out.chans)
        if result.shape != expected or result.dtype != out.dtype:
            raise StageError(
                grpc.StatusCode.INTERNAL,
                f"stage {stage.type} returned {result.dtype} {result.shape} for a {expected} tile",
            )
        return result

    async def _compute_reporting_steps(self, job: _Job, inputs: dict) -> AsyncIterator[np.ndarray | stage_pb2.StageOutput]:
        """Run one processing tile in a worker thread; while it runs, pass on the steps the
        stage reports (as progress in "steps" over the whole stage), then yield its result."""
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        context = self.stage.context

        def on_step(done: int, total: int) -> None:  # in the worker thread
            self.steps_run += 1
            loop.call_soon_threadsafe(steps.put_nowait, (done, total))

        context.on_step = on_step
        work = asyncio.ensure_future(asyncio.to_thread(self._compute, job, inputs))
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
                # no one waits for its outcome now (Cancelled, as a rule): take it when it
                # comes, so that asyncio does not log it as an exception never retrieved
                work.add_done_callback(lambda finished: finished.cancelled() or finished.exception())

    def _step_progress(self, done: int, total: int) -> stage_pb2.StageOutput:
        """Steps over the whole stage: those of the processing tiles before this one, plus
        this one's."""
        jobs = self.stage.jobs_with_steps(len(self.jobs))
        return stage_pb2.StageOutput(progress=stage_pb2.Progress(
            unit="steps", done=self.stepped_jobs_done * total + done, total=jobs * total))

    # --- output ----------------------------------------------------------------------------

    def _place(self, out: _Output, window: Rect, result: np.ndarray, weight: np.ndarray | None, counted: int | None) -> Iterator[Any]:
        """Put a finished region into the transport tiles it touches; send each tile whose
        last piece this was. counted: the amount of work the region ends per tile (1 for a
        processing tile; None: its area, for streaming stages)."""
        for i in out.touching(window):
            rect = out.rect(i)
            inter = rect.intersection(window)
            if inter is None:
                continue
            piece = result[inter.relative_to(window).slices]
            amount = counted or inter.area
            if weight is not None:
                sums = out.sums.get(i)
                if sums is None:
                    sums = out.sums[i] = (
                        np.zeros((rect.height, rect.width, out.chans), dtype=np.float32),
                        np.zeros((rect.height, rect.width), dtype=np.float32),
                    )
                    self._count_output(sums[0].nbytes + sums[1].nbytes)
                local = inter.relative_to(rect).slices
                w = weight[inter.relative_to(window).slices]
                sums[0][local] += piece * w[:, :, None]
                sums[1][local] += w
            elif inter != rect or out.pending[i] != amount:  # one piece of several: assemble
                buffer = out.partial.get(i)
                if buffer is None:
                    buffer = out.partial[i] = np.empty((rect.height, rect.width, out.chans), dtype=out.dtype)
                    self._count_output(buffer.nbytes)
                buffer[inter.relative_to(rect).slices] = piece
            # else: the whole tile in one piece, sent from the result as it is
            out.pending[i] -= amount
            if out.pending[i] == 0:
                yield self._send(out, i, rect, piece)

    def _send(self, out: _Output, i: int, rect: Rect, piece: np.ndarray) -> Any:
        if i in out.sums:
            total, weight = out.sums.pop(i)
            self._count_output(-(total.nbytes + weight.nbytes))
            blended = total / weight[:, :, None]
            if out.dtype == np.uint8:
                blended = np.clip(np.rint(blended), 0, 255)
            pixels = blended.astype(out.dtype)
        elif i in out.partial:
            pixels = out.partial.pop(i)
            self._count_output(-pixels.nbytes)
        else:
            pixels = piece
        out.tiles_left -= 1
        self.tiles_emitted += 1
        kept = self.kept.get(out.id)
        if kept is not None:
            self._count_output(kept.put(rect, pixels))
        if self._encoded:
            return encode_tile(out.id, rect, pixels)
        message = stage_pb2.StageOutput()
        tile = message.tile
        tile.canvas_id, tile.x, tile.y, tile.width, tile.height = out.id, rect.x, rect.y, rect.width, rect.height
        tile.pixels = pixels.tobytes()
        return message

    def _commit(self, job: _Job, result: np.ndarray) -> Iterator[Any]:
        out = self.outputs[job.output]
        weight = None
        if out.blend:
            weight = feather_weights(job.window, out.width, out.height, self.stage.overlap)
        yield from self._place(out, job.window, result, weight, counted=1)
        self.tiles_processed += 1
        out.jobs_left -= 1
        yield stage_pb2.StageOutput(
            progress=stage_pb2.Progress(unit="tiles", done=self.tiles_processed, total=len(self.jobs))
        )

    async def _give(self, out: _Output) -> AsyncIterator[stage_pb2.StageOutput]:
        """A kept output's complete bands to the stage, in order (each let go once given); once
        the whole output has gone, finish it: the artifacts the stage reports."""
        kept = self.kept.get(out.id)
        if kept is None:
            return
        stage, artifacts = self.stage, []
        for y, pixels in kept.complete():
            try:
                if kept.rows:
                    await asyncio.to_thread(stage.write_rows, out.plan, y, pixels)
                else:
                    artifacts = await asyncio.to_thread(stage.finish, out.plan, pixels)
            finally:
                self._count_output(-pixels.nbytes)
            del pixels  # not held while the next band is written
        if kept.done:
            if kept.rows:
                artifacts = await asyncio.to_thread(stage.finish, out.plan, None)
            del self.kept[out.id]  # finished: nothing to discard
        for artifact in artifacts:
            yield stage_pb2.StageOutput(artifact=artifact)

    def _discard_kept(self) -> None:
        """Kept outputs the stream ends without finishing: the stage lets go of what it began."""
        for kept_id in list(self.kept):
            try:
                self.stage.discard(self.outputs[kept_id].plan)
            except Exception:  # the stream's own error is the one to report
                log.exception("%s: discarding output %d", self.stage.label, kept_id)

    # --- running ---------------------------------------------------------------------------

    async def run(self, messages: AsyncIterator[Any], encoded: bool = False) -> AsyncIterator[Any]:
        """The stage's output stream. messages: StageInput messages after the start (or
        TileViews from wire.parse_stage_input). With encoded, output tiles come as serialised
        StageOutput bytes (wire.encode_tile) instead of messages."""
        self._encoded = encoded
        for out in self.outputs:
            yield stage_pb2.StageOutput(canvas=out.plan.canvas)
        body = self._run_streaming(messages) if self.stage.streams else self._run_windows(messages)
        try:
            async for message in body:
                yield message
        finally:
            if self.kept:  # shielded: it runs to its end even if this stream is being cancelled
                await asyncio.shield(asyncio.to_thread(self._discard_kept))
        for notice in self.stage.context.notices:
            yield stage_pb2.StageOutput(notice=stage_pb2.Notice(message=notice))
        yield stage_pb2.StageOutput(
            done=stage_pb2.StageDone(tiles_processed=self.tiles_processed, tiles_emitted=self.tiles_emitted)
        )

    async def _run_windows(self, messages: AsyncIterator[Any]) -> AsyncIterator[Any]:
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
                self._room.set()
                inputs = self._take(job)
                result = None
                async for message in self._compute_reporting_steps(job, inputs):
                    if isinstance(message, np.ndarray):
                        result = message
                    else:
                        yield message
                del inputs
                for message in self._commit(job, result):
                    yield message
                remaining -= 1
                async for message in self._give(self.outputs[job.output]):
                    yield message
            await reader  # drain input this stage did not need, so the sender never blocks
        finally:
            reader.cancel()

    async def _run_streaming(self, messages: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """Streaming stages: each input tile goes to the stage (in a worker thread) before the
        next is read, and the regions it finishes go out."""
        stage = self.stage
        readers: dict[int, list[tuple[int, str]]] = {}
        for number, out in enumerate(self.outputs):
            out.pending = [out.rect(i).area for i in range(len(out.pending))]
            for name, source in out.plan.sources.items():
                readers.setdefault(source.id, []).append((number, name))
        states = [stage.stream_open(out.plan) for out in self.outputs]
        total = sum(len(out.pending) for out in self.outputs)
        held = [0] * len(states)
        async for message in messages:
            tile = self._tile_of(message)
            if tile is None:
                break
            checked = self._check(tile)
            if checked is None:
                continue
            for number, name in readers[tile.canvas_id]:
                out = self.outputs[number]
                regions = await asyncio.to_thread(stage.stream_tile, states[number], out.plan, name, tile.rect, checked[1])
                now = stage.stream_held_bytes(states[number])
                self._count_input(now - held[number])
                held[number] = now
                for rect, pixels in regions:
                    self.tiles_processed += 1
                    for sent in self._place(out, rect, pixels, None, counted=None):
                        yield sent
                async for artifact in self._give(out):
                    yield artifact
                if regions:  # progress in output transport tiles sent
                    yield stage_pb2.StageOutput(progress=stage_pb2.Progress(unit="tiles", done=self.tiles_emitted, total=total))
        incomplete = sorted({cid for cid, pairs in readers.items() for number, _ in pairs if self.outputs[number].tiles_left})
        if incomplete:
            raise StageError(grpc.StatusCode.INVALID_ARGUMENT, f"input ended before input canvas(es) {incomplete} were complete")

    def _incomplete_input(self) -> str:
        missing = sorted(
            {cid for job in self.jobs if not job.ready for cid, r in job.needs.values() if not self.sources[cid].covered(r)}
        )
        return f"input ended before input canvas(es) {missing} were complete"
