"""Upscale stages: make images larger."""

from __future__ import annotations

import numpy as np

from tilechain.v1 import tiles_pb2

from .core.params import Param
from .core.resample import FILTERS, resize_tile, scaled_input_rect
from .core.stage import Stage, TileWork, register
from .core.tiles import Rect


@register
class UpscaleSimple(Stage):
    type = "upscale-simple"
    family = "upscale"
    doc = "Enlarge each image by an integer factor with a classic resampling filter."
    params = (
        Param("method", str, "lanczos", "Resampling filter.", choices=FILTERS),
        Param("scale", int, 2, "Factor applied to width and height.", min=2, max=8),
    )
    size_params = ("scale",)

    def output_canvas(self, image: tiles_pb2.Canvas) -> tiles_pb2.Canvas:
        return self.derived(image, image.width * self.p["scale"], image.height * self.p["scale"])

    def input_rect(self, window: Rect, name: str, source: tiles_pb2.Canvas, output: tiles_pb2.Canvas) -> Rect:
        return scaled_input_rect(window, source, output, self.p["method"])

    def process_tile(self, work: TileWork) -> np.ndarray:
        return resize_tile(work, self.p["method"])
