"""The engine's memory model, in-process: input kept only while a processing tile reads it,
output pixels only for tiles not yet sent, streaming stages, per-tile noise, backpressure, and
tiles on the wire. Results stay exactly what the untiled computation gives."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tilechain.services.core.codecs import tile_message
from tilechain.services.core.config import Settings
from tilechain.services.core.engine import MAX_READY, TileEngine, plan_outputs
from tilechain.services.core.resample import FILTERS, StreamingResize, resize
from tilechain.services.core.stage import KEEP_CANVAS, KEEP_ROWS, Context, OutputPlan, Stage, StageError
from tilechain.services.core.tiles import Rect, plan_windows, transport_grid
from tilechain.services.core.wire import TileView, encode_tile, is_tile_message, parse_stage_input, parse_tile_message
from tilechain.services.source import noise
from tilechain.v1 import stage_pb2, tiles_pb2

from .engine_harness import canvas, make_stage, random_partition, run_stage

RNG = np.random.default_rng(11)


def run_engine(stage, inputs, pixels, rects, transport_tile=64):
    """run_stage, also returning the engine (for its memory counters)."""
    engines: list[TileEngine] = []
    out, _ = run_stage(stage, inputs, pixels, rects, transport_tile=transport_tile, engines=engines)
    return out, engines[0]


def test_a_tile_local_stage_holds_a_band_of_input_not_the_canvas() -> None:
    pixels = RNG.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    stage = make_stage("upscale-simple", {"method": "lanczos", "scale": 2}, max_tile=128)
    out, engine = run_engine(stage, [canvas(512, 512)], {0: pixels}, {0: transport_grid(512, 512, 32)}, transport_tile=64)
    assert np.array_equal(out[0], resize(pixels, 1024, 1024, "lanczos"))
    canvas_bytes = pixels.nbytes
    # a processing tile reads 64 input rows plus the halo: a few rows of 32-px input tiles
    assert 0 < engine.peak_input < canvas_bytes / 3
    assert engine.held_input == 0 and engine.held_output == 0  # everything let go at the end
    # windows of 128 output px fill 64-px transport tiles whole: sent straight from the result
    assert engine.peak_output == 0


@pytest.mark.parametrize("method", ["lanczos", "nearest"])
def test_a_resize_cuts_its_output_rows_where_the_input_rows_end(method: str) -> None:
    """x2 with 512-px tiles in and out. On a plain grid the output row that starts half-way
    down an input tile row would need the next row's top halo, so the lower half of the row
    above would wait for it: a band as wide as the image. The output grid is shifted up
    instead (Canvas.grid), so that every output row needs only input rows already received:
    all that waits is a halo's rows, and a few tiles of the row coming in."""
    width, height, tile = 4096, 1536, 512
    pixels = RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)
    stage = make_stage("upscale-simple", {"method": method, "scale": 2}, max_tile=tile)
    out, engine = run_engine(stage, [canvas(width, height)], {0: pixels}, {0: transport_grid(width, height, tile)}, transport_tile=tile)
    assert np.array_equal(out[0], resize(pixels, 2 * width, 2 * height, method))
    grid = engine.outputs[0].plan.canvas.grid
    assert grid.edge == tile and 0 < grid.row_shift < 32
    halo_rows = 16
    assert engine.peak_input <= width * halo_rows * 3 + 3 * tile * tile * 3
    assert engine.held_input == 0


def test_stages_after_a_shifted_grid_line_their_rows_up_with_it() -> None:
    """The grid is a hint carried by the planned canvas: a second resize plans its rows on
    the first's shifted rows, and a pass-through stage (persist) takes them as they are, so
    each tile it receives is a tile it sends and a band it keeps."""
    settings = Settings()
    first = make_stage("upscale-simple", {"method": "lanczos", "scale": 2}, max_tile=64)
    middle = plan_outputs(first, [canvas(256, 256)], settings, 64)[0].canvas
    second = make_stage("upscale-simple", {"method": "lanczos", "scale": 2}, max_tile=64)
    pixels = RNG.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    rows = transport_grid(512, 512, 64, middle.grid.row_shift)
    out, engine = run_engine(second, [middle], {0: pixels}, {0: rows}, transport_tile=64)
    assert np.array_equal(out[0], resize(pixels, 1024, 1024, "lanczos"))
    assert engine.peak_input <= 512 * 16 * 3 + 3 * 64 * 64 * 3  # a halo's rows, as above
    kept = KeepingStage(KEEP_ROWS)
    out, engine = run_engine(kept, [middle], {0: pixels}, {0: rows}, transport_tile=64)
    assert engine.outputs[0].plan.canvas.grid == middle.grid
    assert np.array_equal(out[0], pixels)
    assert [y for y, _ in kept.rows] == sorted({r.y for r in rows})  # a band per row received
    assert engine.peak_output == max(r.height for r in rows) * 512 * 3  # one band at a time


@pytest.mark.parametrize("edge, shift", [(64, 63), (7, 100), (4096, 5)])
def test_a_grid_hint_that_is_wrong_costs_memory_not_correctness(edge: int, shift: int) -> None:
    """The grid is a hint from whoever made the start message: one that does not match the
    tiles sent (or is nonsense) still gives the exact result."""
    source = canvas(256, 192)
    source.grid.edge, source.grid.row_shift = edge, shift
    pixels = RNG.integers(0, 256, (192, 256, 3), dtype=np.uint8)
    stage = make_stage("upscale-simple", {"method": "bicubic", "scale": 2}, max_tile=64)
    out, engine = run_engine(stage, [source], {0: pixels}, {0: transport_grid(256, 192, 64)}, transport_tile=64)
    assert np.array_equal(out[0], resize(pixels, 512, 384, "bicubic"))
    assert engine.outputs[0].plan.canvas.grid.row_shift < 64 and engine.held_input == 0
    out, _ = run_engine(KeepingStage(KEEP_ROWS), [source], {0: pixels}, {0: transport_grid(256, 192, 64, 20)}, transport_tile=64)
    assert np.array_equal(out[0], pixels)


def test_a_shifted_grid_and_windows_line_up() -> None:
    rects = transport_grid(100, 150, 64, 20)
    assert sorted({(r.y, r.height) for r in rects}) == [(0, 44), (44, 64), (108, 42)]
    assert sum(r.area for r in rects) == 100 * 150
    windows = plan_windows(100, 150, 32, 0, row_shift=20)  # rows of 32 lie within rows of 64
    assert sorted({(w.y, w.height) for w in windows}) == [(0, 12), (12, 32), (44, 32), (76, 32), (108, 32), (140, 10)]
    assert {r.y for r in rects} <= {w.y for w in windows}


def test_blending_keeps_sums_only_for_tiles_not_yet_sent() -> None:
    pixels = RNG.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    tiled = make_stage("upscale-simple", {"method": "bicubic", "scale": 2}, max_tile=96, overlap=24)
    out, engine = run_engine(tiled, [canvas(256, 256)], {0: pixels}, {0: transport_grid(256, 256, 32)}, transport_tile=32)
    whole = make_stage("upscale-simple", {"method": "bicubic", "scale": 2}, max_tile=0)
    reference, _ = run_stage(whole, [canvas(256, 256)], {0: pixels}, {0: transport_grid(256, 256, 32)})
    assert np.array_equal(out[0], reference[0])
    # a float32 sum and weight per pixel would be 512² x 16 bytes; only a band of tiles is open
    assert 0 < engine.peak_output < 512 * 512 * 16 / 4
    assert engine.held_output == 0


@pytest.mark.parametrize("method", list(FILTERS))
def test_streaming_thumbnail_is_exact_for_any_partition_and_order(method: str) -> None:
    pixels = RNG.integers(0, 256, (300, 410, 3), dtype=np.uint8)
    rects = random_partition(410, 300, np.random.default_rng(5))
    np.random.default_rng(6).shuffle(rects)
    stage = make_stage("reduce-thumbnail", {"width": 97, "height": 97, "method": method})
    out, engine = run_engine(stage, [canvas(410, 300)], {0: pixels}, {0: rects}, transport_tile=32)
    assert np.array_equal(out[0], resize(pixels, 97, 71, method))
    assert engine.held_input == 0


def test_streaming_thumbnail_holds_a_few_tiles_of_a_row_major_stream() -> None:
    edge = 2048
    resizer = StreamingResize(edge, edge, 3, 256, 256, "lanczos")
    tile = RNG.integers(0, 256, (128, 128, 3), dtype=np.uint8)
    peak = rows = 0
    for rect in transport_grid(edge, edge, 128):
        for band, pixels in resizer.add(rect, tile[: rect.height, : rect.width]):
            rows += band.height
            assert pixels.shape == (band.height, 256, 3)
        peak = max(peak, resizer.held_bytes)
    assert rows == 256 and resizer.held_bytes == 0
    assert peak < edge * edge * 3 / 16  # a few input tiles and some hundred reduced rows


@pytest.mark.parametrize("method", ["uniform", "gaussian"])
def test_noise_made_per_tile_is_the_whole_canvas_noise(method: str) -> None:
    stage = make_stage("source-noise", {"method": method, "width": 200, "height": 150, "seed": 9, "count": 2})
    out, engine = run_engine(stage, [], {}, {}, transport_tile=64)
    for index in (0, 1):
        assert np.array_equal(out[index], noise(method, 200, 150, 9 + index))
    assert not stage.needs_whole_canvas and engine.peak_input == 0


def test_the_engine_stops_reading_while_its_output_is_not_taken() -> None:
    """Backpressure: the consumer takes one output tile and stops; the engine then reads only
    until MAX_READY processing tiles wait with their input, not the rest of the stream."""
    pixels = RNG.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    rects = transport_grid(256, 256, 16)  # 256 input tiles
    stage = make_stage("reduce-crop", {"width": 256, "height": 256}, max_tile=16)
    source = canvas(256, 256)
    pulled = 0

    async def feed():
        nonlocal pulled
        for rect in rects:
            pulled += 1
            yield stage_pb2.StageInput(tile=tile_message(0, rect, pixels))
        yield stage_pb2.StageInput(end=stage_pb2.InputEnd())

    async def main() -> tuple[int, int]:
        engine = TileEngine(stage, [source], plan_outputs(stage, [source], stage.context.settings), 16)
        output = engine.run(feed())
        async for message in output:
            if message.WhichOneof("kind") == "tile":
                break
        for _ in range(5 * len(rects)):  # give the reader every chance to run ahead
            await asyncio.sleep(0)
        held = pulled
        async for _ in output:  # then take everything: the rest flows
            pass
        return held, len(engine.ready)

    held, left = asyncio.run(main())
    # MAX_READY waiting tiles, one more read before the reader checks, the one being sent
    assert held <= MAX_READY + 2 < len(rects) // 8, f"read {held} of {len(rects)} input tiles while its output waited"
    assert pulled == len(rects) and left == 0


def test_a_tile_crosses_the_wire_as_the_protobuf_message() -> None:
    pixels = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    rect = Rect(9, 0, 7, 5)
    data = encode_tile(3, rect, pixels[:, :, :])
    as_output = stage_pb2.StageOutput.FromString(data)
    assert as_output.WhichOneof("kind") == "tile"
    assert (as_output.tile.canvas_id, as_output.tile.x, as_output.tile.y, as_output.tile.width, as_output.tile.height) == (3, 9, 0, 7, 5)
    assert as_output.tile.pixels == pixels.tobytes()
    assert stage_pb2.StageInput.FromString(data).tile == as_output.tile  # the same bytes as a StageInput
    assert is_tile_message(data)
    view = parse_stage_input(data)
    assert isinstance(view, TileView) and view.rect == rect and bytes(view.pixels) == pixels.tobytes()
    # what protobuf writes parses the same way; a non-contiguous array encodes its values
    tile = tiles_pb2.Tile(canvas_id=1, x=2, y=3, width=2, height=1, pixels=b"abcdef")
    serialized = stage_pb2.StageInput(tile=tile).SerializeToString()
    assert parse_tile_message(serialized).to_proto() == tile
    strided = pixels[:, ::2]
    assert stage_pb2.StageOutput.FromString(encode_tile(0, Rect(0, 0, 4, 5), strided)).tile.pixels == strided.tobytes()


def test_other_messages_are_parsed_by_protobuf() -> None:
    start = stage_pb2.StageInput(start=stage_pb2.StageStart(name="s", type="reduce-crop"))
    end = stage_pb2.StageInput(end=stage_pb2.InputEnd())
    for message in (start, end):
        data = message.SerializeToString()
        assert not is_tile_message(data)
        assert parse_stage_input(data) == message
    # a tile message with a field this reader does not know goes to protobuf, which keeps it
    tile = stage_pb2.StageInput(tile=tiles_pb2.Tile(width=1, height=1, pixels=b"xyz")).SerializeToString()
    assert parse_tile_message(tile) is not None
    unknown = b"\x12" + bytes([tile[1] + 2]) + tile[2:] + b"\x38\x01"  # field 7 = 1 inside the tile
    assert parse_tile_message(unknown) is None
    assert parse_stage_input(unknown).tile.pixels == b"xyz"


# --- outputs a stage keeps (persist): bands of rows, in order, as they complete ------------------


class KeepingStage(Stage):
    """Passes its tiles through (streaming) and keeps its output as persist does: records the
    rows write_rows gets, what finish gets, and whether discard came."""

    type, family, streams = "test-keeping", "persist", True

    def __init__(self, mode: str) -> None:
        super().__init__("keep", {}, Context("job", Settings()))
        self.mode = mode
        self.rows: list[tuple[int, np.ndarray]] = []
        self.finished: list[np.ndarray | None] = []
        self.discarded = 0

    def keeps(self, output: OutputPlan) -> str:
        return self.mode

    def stream_open(self, output: OutputPlan) -> None:
        return None

    def stream_tile(self, state, output, name, rect, pixels):
        return [(rect, pixels)]

    def write_rows(self, output: OutputPlan, y: int, pixels: np.ndarray) -> None:
        self.rows.append((y, pixels.copy()))

    def finish(self, output: OutputPlan, pixels: np.ndarray | None) -> list:
        self.finished.append(pixels)
        return []

    def discard(self, output: OutputPlan) -> None:
        self.discarded += 1


@pytest.mark.parametrize("seed", [1, 2])
def test_kept_rows_reach_the_stage_in_order_whatever_order_the_tiles_come_in(seed: int) -> None:
    rng = np.random.default_rng(seed)
    image = RNG.integers(0, 256, (150, 203, 3), dtype=np.uint8)
    rects = random_partition(203, 150, rng)
    rng.shuffle(rects)
    stage = KeepingStage(KEEP_ROWS)
    out, engine = run_engine(stage, [canvas(203, 150)], {0: image}, {0: rects}, transport_tile=32)
    assert np.array_equal(out[0], image)
    assert [y for y, _ in stage.rows] == list(range(0, 150, 32))  # one band per row of transport tiles
    assert np.array_equal(np.concatenate([rows for _, rows in stage.rows]), image)
    assert stage.finished == [None] and stage.discarded == 0
    assert engine.held_output == 0


def test_kept_rows_in_raster_order_hold_one_band_and_a_kept_canvas_holds_it_all() -> None:
    image = RNG.integers(0, 256, (256, 320, 3), dtype=np.uint8)
    band_bytes = 32 * 320 * 3
    rows = KeepingStage(KEEP_ROWS)
    _, engine = run_engine(rows, [canvas(320, 256)], {0: image}, {0: transport_grid(320, 256, 32)}, transport_tile=32)
    assert engine.peak_output == band_bytes  # each band goes to the stage as its last tile comes
    whole = KeepingStage(KEEP_CANVAS)
    _, engine = run_engine(whole, [canvas(320, 256)], {0: image}, {0: transport_grid(320, 256, 32)}, transport_tile=32)
    assert engine.peak_output == image.nbytes and whole.rows == []
    assert np.array_equal(whole.finished[0], image)


def test_a_kept_output_that_never_completes_is_discarded() -> None:
    stage = KeepingStage(KEEP_ROWS)
    image = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    with pytest.raises(StageError, match="input ended before"):
        run_engine(stage, [canvas(64, 64)], {0: image}, {0: [Rect(0, 0, 64, 40)]}, transport_tile=32)
    assert [y for y, _ in stage.rows] == [0]  # the first band was complete and went out
    assert stage.finished == [] and stage.discarded == 1


@pytest.mark.parametrize("stage_type", ["source-image", "edit-metadata"])
def test_a_pass_through_stage_holds_no_input_in_any_order(stage_type: str) -> None:
    """source-image and edit-metadata stream their tiles straight through (PassThroughStage):
    the output is the input, and the engine holds no input, even with shuffled irregular tiles
    (only output tiles being re-cut to the transport grid); tiles on the grid pass untouched."""
    pixels = RNG.integers(0, 256, (300, 520, 3), dtype=np.uint8)
    source = canvas(520, 300, attached=stage_type == "source-image")
    rects = random_partition(520, 300, RNG)
    RNG.shuffle(rects)
    out, engine = run_engine(make_stage(stage_type, {}), [source], {0: pixels}, {0: rects})
    assert np.array_equal(out[0], pixels)
    assert engine.peak_input == 0 and 0 < engine.peak_output < pixels.nbytes
    grid = transport_grid(520, 300, 64)
    out, engine = run_engine(make_stage(stage_type, {}), [source], {0: pixels}, {0: grid[::-1]}, transport_tile=64)
    assert np.array_equal(out[0], pixels)
    assert engine.peak_input == 0 and engine.peak_output == 0


def test_a_tile_still_running_when_its_stream_ends_is_stopped_and_its_end_taken() -> None:
    """The caller goes away while a processing tile runs in its worker thread: the engine asks
    the worker to stop (cancel_event) and takes the outcome (Cancelled) when it comes, so
    asyncio reports no exception that was never retrieved."""
    import gc
    import threading

    stage = make_stage("upscale-simple", {"method": "nearest", "scale": 2}, max_tile=64)
    finished = threading.Event()

    def process_tile(work):
        try:
            stage.context.on_step(1, 4)
            stage.context.cancel_event.wait(30)
            stage.context.check_cancelled()
        finally:
            finished.set()

    stage.process_tile = process_tile
    source = canvas(64, 64)
    engine = TileEngine(stage, [source], plan_outputs(stage, [source], Settings()), 64)
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)

    async def main() -> list:
        lost: list = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: lost.append(context["message"]))

        async def feed():
            yield stage_pb2.StageInput(tile=tile_message(0, Rect(0, 0, 64, 64), pixels))
            yield stage_pb2.StageInput(end=stage_pb2.InputEnd())

        outputs = engine.run(feed())
        kinds = []
        while "progress" not in kinds:  # the output canvas first, then the tile's first step
            kinds.append((await outputs.__anext__()).WhichOneof("kind"))
        await outputs.aclose()  # the caller has gone
        await asyncio.to_thread(finished.wait, 30)
        for _ in range(3):  # the worker's outcome reaches the loop, then the task is let go
            await asyncio.sleep(0)
        gc.collect()
        return lost

    assert asyncio.run(main()) == []
    assert stage.context.cancel_event.is_set()
