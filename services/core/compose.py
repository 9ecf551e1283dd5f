"""Stages made of other stages: run a stage through the same tile engine, in this process, on
whole canvases held in memory. A composite stage (upscale-highres: an upscaler, then tiled
img2img, repeated) calls this from its own work, so the inner stages tile, blend and seed
exactly as they do when they stand alone in a chain."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, Callable

import numpy as np

from tilechain.v1 import stage_pb2, tiles_pb2

from .codecs import canvas_layout, split_tiles
from .engine import TileEngine, plan_outputs
from .stage import Context, Stage


def inner_context(outer: Context) -> Context:
    """A context for an inner stage: the outer one's job, settings, models, cancellation and
    notices, but its own step reporter (the engine sets that one per processing tile)."""
    return Context(
        outer.job_id, outer.settings, outer.models, attempt=outer.attempt,
        cancel_event=outer.cancel_event, notices=outer.notices,
    )


@dataclass
class Image:
    canvas: tiles_pb2.Canvas
    pixels: np.ndarray


def plan_in_memory(stage: Stage, inputs: list[tiles_pb2.Canvas]) -> list[tiles_pb2.Canvas]:
    """The stage's output canvases for these inputs (its params and sizes checked)."""
    return [plan.canvas for plan in plan_outputs(stage, inputs, stage.context.settings)]


def run_in_memory(
    stage: Stage, inputs: list[Image], on_step: Callable[[int, int], None] | None = None, transport_tile: int = 512
) -> list[Image]:
    """Run the stage on whole input canvases; its outputs, whole. Blocks the calling thread (a
    composite stage's worker thread) while an event loop of its own drives the engine; the
    inner stage's denoising steps go to on_step as (done, total) over the inner stage."""
    canvases = [image.canvas for image in inputs]

    async def feed() -> AsyncIterator[stage_pb2.StageInput]:
        for image in inputs:
            for tile in split_tiles(image.canvas.id, image.pixels, transport_tile):
                yield stage_pb2.StageInput(tile=tile)
        yield stage_pb2.StageInput(end=stage_pb2.InputEnd())

    async def run() -> list[Image]:
        outputs = plan_outputs(stage, canvases, stage.context.settings, transport_tile)
        engine = TileEngine(stage, canvases, outputs, transport_tile)
        images: dict[int, Image] = {}
        async for message in engine.run(feed()):
            kind = message.WhichOneof("kind")
            if kind == "canvas":
                chans, dtype = canvas_layout(message.canvas)
                images[message.canvas.id] = Image(message.canvas, np.zeros((message.canvas.height, message.canvas.width, chans), dtype))
            elif kind == "tile":
                tile = message.tile
                target = images[tile.canvas_id].pixels
                target[tile.y : tile.y + tile.height, tile.x : tile.x + tile.width] = np.frombuffer(
                    tile.pixels, dtype=target.dtype
                ).reshape(tile.height, tile.width, -1)
            elif kind == "progress" and message.progress.unit == "steps" and on_step is not None:
                on_step(message.progress.done, message.progress.total)
            # notices: the inner context shares the outer one's list, which the outer engine sends
        return [images[plan.canvas.id] for plan in outputs]

    return asyncio.run(run())
