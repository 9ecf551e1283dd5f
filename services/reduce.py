"""Reduce stages: make images smaller (crop, thumbnail)."""

from __future__ import annotations

import numpy as np

from tilechain.v1 import tiles_pb2

from .core.params import Param, ParamError
from .core.codecs import channels
from .core.resample import FILTERS, StreamingResize
from .core.stage import OutputPlan, Stage, TileWork, register
from .core.tiles import Rect


@register
class ReduceCrop(Stage):
    type = "reduce-crop"
    family = "reduce"
    doc = "Cut a rectangle out of each image."
    params = (
        Param("left", int, 0, "Left edge of the rectangle.", min=0),
        Param("top", int, 0, "Top edge of the rectangle.", min=0),
        Param("width", int, doc="Width of the rectangle.", min=1),
        Param("height", int, doc="Height of the rectangle.", min=1),
    )
    size_params = ("width", "height")
    exact_tiles = True  # a copy of input pixels

    def output_canvas(self, image: tiles_pb2.Canvas) -> tiles_pb2.Canvas:
        p = self.p
        for edge, size, start, limit in (("width", p["width"], "left", image.width), ("height", p["height"], "top", image.height)):
            if p[start] >= limit:
                raise ParamError(start, f"{p[start]} is outside the {image.width}x{image.height} image")
            if p[start] + size > limit:
                raise ParamError(edge, f"{start} {p[start]} + {edge} {size} reaches past the image's {edge} {limit}")
        return self.derived(image, p["width"], p["height"])

    def input_rect(self, window: Rect, name: str, source: tiles_pb2.Canvas, output: tiles_pb2.Canvas) -> Rect:
        return Rect(window.x + self.p["left"], window.y + self.p["top"], window.width, window.height)

    def process_tile(self, work: TileWork) -> np.ndarray:
        return work.pixels()


@register
class ReduceThumbnail(Stage):
    """A streaming filter: the horizontal pass runs on each input tile as soon as its
    neighbours' columns are in, the vertical pass on each band of output rows as soon as its
    reduced rows are; it holds a few input tiles and a few hundred reduced rows, never the
    image (core/resample.py, StreamingResize). Exact: the result is that of an untiled resize."""

    type = "reduce-thumbnail"
    family = "reduce"
    doc = (
        "Shrink each image to fit inside width x height, keeping its aspect ratio; never enlarges. "
        "A streaming filter: each input tile is filtered as it arrives, holding a few tiles, not the image."
    )
    params = (
        Param("width", int, 256, "Largest width.", min=1, max=65536),
        Param("height", int, 256, "Largest height.", min=1, max=65536),
        Param("method", str, "lanczos", "Resampling filter.", choices=FILTERS),
    )
    size_params = ("width", "height")
    streams = True

    def output_canvas(self, image: tiles_pb2.Canvas) -> tiles_pb2.Canvas:
        ratio = min(1.0, self.p["width"] / image.width, self.p["height"] / image.height)
        width = max(1, round(image.width * ratio))
        height = max(1, round(image.height * ratio))
        return self.derived(image, width, height)

    def stream_open(self, output: OutputPlan) -> StreamingResize:
        source, canvas = output.sources["image"], output.canvas
        return StreamingResize(source.width, source.height, channels(source.format), canvas.width, canvas.height, self.p["method"])

    def stream_tile(self, state: StreamingResize, output: OutputPlan, name: str, rect: Rect, pixels: np.ndarray) -> list[tuple[Rect, np.ndarray]]:
        self.context.check_cancelled()
        return state.add(rect, pixels)

    def stream_held_bytes(self, state: StreamingResize) -> int:
        return state.held_bytes
