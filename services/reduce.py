"""Reduce stages: make images smaller (crop, thumbnail)."""

from __future__ import annotations

import numpy as np

from tilechain.v1 import tiles_pb2

from .core.params import Param, ParamError
from .core.resample import FILTERS, resize_tile, scaled_input_rect
from .core.stage import Stage, TileWork, register
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
    type = "reduce-thumbnail"
    family = "reduce"
    doc = "Shrink each image to fit inside width x height, keeping its aspect ratio; never enlarges."
    params = (
        Param("width", int, 256, "Largest width.", min=1, max=65536),
        Param("height", int, 256, "Largest height.", min=1, max=65536),
        Param("method", str, "lanczos", "Resampling filter.", choices=FILTERS),
    )
    size_params = ("width", "height")

    def output_canvas(self, image: tiles_pb2.Canvas) -> tiles_pb2.Canvas:
        ratio = min(1.0, self.p["width"] / image.width, self.p["height"] / image.height)
        width = max(1, round(image.width * ratio))
        height = max(1, round(image.height * ratio))
        return self.derived(image, width, height)

    def input_rect(self, window: Rect, name: str, source: tiles_pb2.Canvas, output: tiles_pb2.Canvas) -> Rect:
        return scaled_input_rect(window, source, output, self.p["method"])

    def process_tile(self, work: TileWork) -> np.ndarray:
        return resize_tile(work, self.p["method"])
