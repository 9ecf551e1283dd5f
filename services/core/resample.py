"""Resampling a window of a resized canvas from a window of the input, so that tiled resizes
equal the untiled resize: Pillow's resize with a source box reads filter support from outside
the box, so given enough halo each output pixel sees exactly the input pixels it would see in a
whole-canvas resize."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from .codecs import from_pil, to_pil
from tilechain.v1 import tiles_pb2

from .stage import TileWork
from .tiles import Rect

FILTERS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
SUPPORT = {"nearest": 1, "bilinear": 1, "bicubic": 2, "lanczos": 3}


def halo_for(method: str, in_size: int, out_size: int) -> int:
    """Input pixels of context a resize to out_size needs around a window: the filter's
    support, stretched by the reduction factor when shrinking, plus one for rounding."""
    stretch = max(1.0, in_size / out_size)
    return math.ceil(SUPPORT[method] * stretch) + 1


def source_rect(window: Rect, in_w: int, in_h: int, out_w: int, out_h: int) -> Rect:
    """The input rect under an output window (before the halo)."""
    x0 = math.floor(window.x * in_w / out_w)
    y0 = math.floor(window.y * in_h / out_h)
    x1 = min(in_w, math.ceil(window.x1 * in_w / out_w))
    y1 = min(in_h, math.ceil(window.y1 * in_h / out_h))
    return Rect(x0, y0, max(1, x1 - x0), max(1, y1 - y0))


def resize_window(
    pixels: np.ndarray, pixels_rect: Rect, window: Rect, in_w: int, in_h: int, out_w: int, out_h: int, method: str
) -> np.ndarray:
    """The output pixels of window in an in_w x in_h -> out_w x out_h resize, from the input
    pixels of pixels_rect (which must cover the window's source area plus the halo)."""
    sx, sy = in_w / out_w, in_h / out_h
    box = (
        window.x * sx - pixels_rect.x,
        window.y * sy - pixels_rect.y,
        window.x1 * sx - pixels_rect.x,
        window.y1 * sy - pixels_rect.y,
    )
    image = to_pil(np.ascontiguousarray(pixels)).resize((window.width, window.height), FILTERS[method], box=box)
    return from_pil(image)


def scaled_input_rect(window: Rect, source: tiles_pb2.Canvas, output: tiles_pb2.Canvas, method: str) -> Rect:
    """For resize stages: the input rect an output window reads, halo included."""
    rect = source_rect(window, source.width, source.height, output.width, output.height)
    halo = max(halo_for(method, source.width, output.width), halo_for(method, source.height, output.height))
    return rect.expand(halo, source.width, source.height)


def resize_tile(work: TileWork, method: str) -> np.ndarray:
    """For resize stages: one processing tile of the resized canvas."""
    source, out = work.source(), work.output
    return resize_window(work.pixels(), work.rect(), work.window, source.width, source.height, out.width, out.height, method)
