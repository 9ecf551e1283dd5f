"""Separable resampling whose result for an output pixel depends only on that pixel's global
position and the input pixels, never on how the canvas was tiled: tiled resizes are
bit-identical to untiled ones. (Pillow's resize with a source box is not: its float box
arithmetic shifts taps by a rounding error, ±1 for smooth filters and whole pixels for
nearest.) The filters are Pillow's (bilinear triangle, bicubic a = -0.5, lanczos-3), with
antialiasing when shrinking, and the same edge handling (taps outside the canvas dropped and
the weights renormalised); results agree with Pillow to within rounding."""

from __future__ import annotations

import math

import numpy as np

from tilechain.v1 import tiles_pb2

from .stage import TileWork
from .tiles import Rect

SUPPORT: dict[str, float] = {"nearest": 0.5, "bilinear": 1.0, "bicubic": 2.0, "lanczos": 3.0}
FILTERS = tuple(SUPPORT)


def _kernel(method: str, x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    if method == "bilinear":
        return np.maximum(0.0, 1.0 - ax)
    if method == "bicubic":
        a = -0.5
        near = ((a + 2.0) * ax - (a + 3.0)) * ax * ax + 1.0
        far = (((ax - 5.0) * ax + 8.0) * ax - 4.0) * a
        return np.where(ax < 1.0, near, np.where(ax < 2.0, far, 0.0))
    return np.where(ax < 3.0, np.sinc(x) * np.sinc(x / 3.0), 0.0)  # lanczos


def _taps(method: str, start: int, count: int, in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Input indices and weights (count, taps) for output pixels start..start+count-1."""
    out = np.arange(start, start + count, dtype=np.int64)
    if method == "nearest":
        # the input pixel under the output pixel's centre, in exact integer arithmetic
        return ((2 * out + 1) * in_size // (2 * out_size))[:, None], np.ones((count, 1), dtype=np.float32)
    scale = in_size / out_size
    stretch = max(scale, 1.0)
    support = SUPPORT[method] * stretch
    center = (out + 0.5) * scale
    first = np.floor(center - support + 0.5).astype(np.int64)
    taps = 2 * math.ceil(support) + 1
    index = first[:, None] + np.arange(taps)
    weight = _kernel(method, (index - center[:, None] + 0.5) / stretch)
    weight[(index < 0) | (index >= in_size)] = 0.0
    weight /= weight.sum(axis=1, keepdims=True)
    return np.clip(index, 0, in_size - 1), weight.astype(np.float32)


def halo_for(method: str, in_size: int, out_size: int) -> int:
    """Input pixels of context a window needs on each side: the filter's support, stretched
    when shrinking, plus margin for the taps' rounding."""
    return math.ceil(SUPPORT[method] * max(1.0, in_size / out_size)) + 2


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
    x_index, x_weight = _taps(method, window.x, window.width, in_w, out_w)
    y_index, y_weight = _taps(method, window.y, window.height, in_h, out_h)
    x_index = np.clip(x_index - pixels_rect.x, 0, pixels_rect.width - 1)
    y_index = np.clip(y_index - pixels_rect.y, 0, pixels_rect.height - 1)
    if method == "nearest":
        return pixels[y_index[:, 0]][:, x_index[:, 0]]
    # rows first, then columns; taps are summed in a fixed order so every tiling agrees
    source = pixels.astype(np.float32)
    across = np.zeros((source.shape[0], window.width, source.shape[2]), dtype=np.float32)
    for t in range(x_index.shape[1]):
        across += x_weight[None, :, t, None] * source[:, x_index[:, t]]
    # like Pillow, hold the intermediate as 8-bit: ringing filters overshoot, and clamping
    # here rather than only at the end keeps the result within rounding of Pillow's
    across = np.clip(np.rint(across), 0, 255)
    result = np.zeros((window.height, window.width, source.shape[2]), dtype=np.float32)
    for t in range(y_index.shape[1]):
        result += y_weight[:, t, None, None] * across[y_index[:, t]]
    return np.clip(np.rint(result), 0, 255).astype(np.uint8)


def scaled_input_rect(window: Rect, source: tiles_pb2.Canvas, output: tiles_pb2.Canvas, method: str) -> Rect:
    """For resize stages: the input rect an output window reads, halo included."""
    rect = source_rect(window, source.width, source.height, output.width, output.height)
    halo = max(halo_for(method, source.width, output.width), halo_for(method, source.height, output.height))
    return rect.expand(halo, source.width, source.height)


def resize_tile(work: TileWork, method: str) -> np.ndarray:
    """For resize stages: one processing tile of the resized canvas."""
    source, out = work.source(), work.output
    return resize_window(work.pixels(), work.rect(), work.window, source.width, source.height, out.width, out.height, method)


def resize(pixels: np.ndarray, width: int, height: int, method: str) -> np.ndarray:
    """A whole-canvas resize with the same arithmetic (the untiled reference)."""
    in_h, in_w = pixels.shape[:2]
    return resize_window(pixels, Rect(0, 0, in_w, in_h), Rect(0, 0, width, height), in_w, in_h, width, height, method)
