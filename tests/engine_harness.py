"""Running one stage through the tile engine in-process, with the input tiles given in a chosen
order: the engine's own behaviour, without processes or sockets."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable

import numpy as np

from tilechain.services.core.codecs import channels, tile_message
from tilechain.services.core.config import Settings
from tilechain.services.core.engine import TileEngine, plan_outputs
from tilechain.services.core.stage import IMAGE, RGB8, Context, load_all
from tilechain.services.core.tiles import Rect
from tilechain.v1 import stage_pb2, tiles_pb2


def canvas(width: int, height: int, id: int = 0, fmt: int = RGB8, role: int = IMAGE, attached: bool = False) -> tiles_pb2.Canvas:
    return tiles_pb2.Canvas(id=id, width=width, height=height, format=fmt, role=role, attached=attached)


def make_stage(stage_type: str, params: dict[str, Any], **overrides: Any):
    stage = load_all()[stage_type].create("s", params, Context("job", Settings(output_root=Settings().output_root.resolve())))
    for key, value in overrides.items():
        setattr(stage, key, value)
    return stage


Gate = Callable[[int, asyncio.Event], Any]


async def _feed(
    pieces: list[stage_pb2.StageInput], log: list, gate: Gate | None, output_seen: asyncio.Event
) -> AsyncIterator[stage_pb2.StageInput]:
    for i, piece in enumerate(pieces):
        if gate is not None:
            await gate(i, output_seen)
        log.append(("in", i))
        yield piece
    yield stage_pb2.StageInput(end=stage_pb2.InputEnd())


def run_stage(
    stage,
    inputs: list[tiles_pb2.Canvas],
    pixels: dict[int, np.ndarray],
    rects: dict[int, list[Rect]],
    transport_tile: int = 64,
    gate: Gate | None = None,
    engines: list | None = None,
) -> tuple[dict[int, np.ndarray], list]:
    """Feed pixels[canvas id] cut into rects[canvas id], in that order; return the assembled
    outputs and the log of ("in", i) / ("out", canvas id) events. gate(i, output_seen) runs
    before input tile i is sent; output_seen is set once an output tile has come out.
    engines, if given, gets the TileEngine (for its counters)."""
    pieces = [
        stage_pb2.StageInput(tile=tile_message(cid, rect, pixels[cid])) for cid in rects for rect in rects[cid]
    ]
    log: list = []

    async def main() -> dict[int, np.ndarray]:
        output_seen = asyncio.Event()
        outputs = plan_outputs(stage, inputs, stage.context.settings, transport_tile)
        engine = TileEngine(stage, inputs, outputs, transport_tile)
        if engines is not None:
            engines.append(engine)
        images: dict[int, np.ndarray] = {}
        async for message in engine.run(_feed(pieces, log, gate, output_seen)):
            kind = message.WhichOneof("kind")
            if kind == "canvas":
                c = message.canvas
                images[c.id] = np.zeros((c.height, c.width, channels(c.format)), dtype=np.uint8)
            elif kind == "tile":
                t = message.tile
                log.append(("out", t.canvas_id))
                output_seen.set()
                images[t.canvas_id][t.y : t.y + t.height, t.x : t.x + t.width] = np.frombuffer(
                    t.pixels, dtype=np.uint8
                ).reshape(t.height, t.width, -1)
        return images

    return asyncio.run(main()), log


def random_partition(width: int, height: int, rng: np.random.Generator) -> list[Rect]:
    """An irregular partition into rectangles: random column cuts per random row band."""
    rects = []
    ys = sorted({0, height, *rng.integers(1, height, 4).tolist()})
    for y0, y1 in zip(ys, ys[1:]):
        xs = sorted({0, width, *rng.integers(1, width, 4).tolist()})
        rects += [Rect(x0, y0, x1 - x0, y1 - y0) for x0, x1 in zip(xs, xs[1:])]
    return rects
