"""Geometry of canvases and tiles: rectangles, processing-tile layouts, feather weights, the
transport grid. (How the engine keeps the tiles it receives is in engine.py.)"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Rect:
    x: int
    y: int
    width: int
    height: int

    @property
    def x1(self) -> int:
        return self.x + self.width

    @property
    def y1(self) -> int:
        return self.y + self.height

    @property
    def area(self) -> int:
        return self.width * self.height

    @property
    def slices(self) -> tuple[slice, slice]:
        """Index an (H, W, C) array with this rect."""
        return slice(self.y, self.y1), slice(self.x, self.x1)

    def intersects(self, other: Rect) -> bool:
        return self.x < other.x1 and other.x < self.x1 and self.y < other.y1 and other.y < self.y1

    def intersection(self, other: Rect) -> Rect | None:
        x, y = max(self.x, other.x), max(self.y, other.y)
        x1, y1 = min(self.x1, other.x1), min(self.y1, other.y1)
        if x1 <= x or y1 <= y:
            return None
        return Rect(x, y, x1 - x, y1 - y)

    def expand(self, margin: int, width: int, height: int) -> Rect:
        """Grow by margin on every side, clamped to a width x height canvas."""
        x, y = max(0, self.x - margin), max(0, self.y - margin)
        x1, y1 = min(width, self.x1 + margin), min(height, self.y1 + margin)
        return Rect(x, y, x1 - x, y1 - y)

    def relative_to(self, origin: Rect) -> Rect:
        return Rect(self.x - origin.x, self.y - origin.y, self.width, self.height)

    def scaled_down(self, factor: int, width: int, height: int) -> Rect:
        """The smallest rect of a canvas factor times smaller that covers this one."""
        x, y = self.x // factor, self.y // factor
        x1 = min(width, -(-self.x1 // factor))
        y1 = min(height, -(-self.y1 // factor))
        return Rect(x, y, x1 - x, y1 - y)


def _axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    if tile >= length:
        return [0]
    if overlap == 0:
        return list(range(0, length, tile))
    stride = tile - overlap
    count = math.ceil((length - overlap) / stride)
    # The last tile is pulled back flush with the edge so that every tile has the full size
    # (models prefer a fixed shape); the feather weights are normalised, so the larger overlap
    # there blends correctly.
    return [min(i * stride, length - tile) for i in range(count)]


def plan_windows(width: int, height: int, max_tile: int, overlap: int, order: str = "grid") -> list[Rect]:
    """Processing tiles covering a width x height canvas, in the order they should run."""
    if max_tile <= 0:
        return [Rect(0, 0, width, height)]
    if overlap >= max_tile:
        raise ValueError(f"overlap {overlap} must be smaller than the tile {max_tile}")
    xs = _axis_starts(width, max_tile, overlap)
    ys = _axis_starts(height, max_tile, overlap)
    grid = [[Rect(x, y, min(max_tile, width - x), min(max_tile, height - y)) for x in xs] for y in ys]
    if order == "spiral":
        return _spiral(grid)
    return [r for row in grid for r in row]


def _spiral(grid: list[list[Rect]]) -> list[Rect]:
    """Clockwise from the top-left corner inwards, as onnx-web orders its tiles, so that the
    centre, where the subject usually is, is blended last and lies on top."""
    out: list[Rect] = []
    top, bottom, left, right = 0, len(grid) - 1, 0, len(grid[0]) - 1
    while top <= bottom and left <= right:
        out += [grid[top][c] for c in range(left, right + 1)]
        out += [grid[r][right] for r in range(top + 1, bottom + 1)]
        if top < bottom:
            out += [grid[bottom][c] for c in range(right - 1, left - 1, -1)]
        if left < right:
            out += [grid[r][left] for r in range(bottom - 1, top, -1)]
        top, bottom, left, right = top + 1, bottom - 1, left + 1, right - 1
    return out


def feather_weights(window: Rect, width: int, height: int, overlap: int) -> np.ndarray:
    """A (h, w) weight map for blending a processing tile: a linear ramp over `overlap` pixels
    at each edge that borders another tile, 1 inside and along the canvas border. Two tiles
    overlapping by exactly `overlap` pixels get weights that sum to one."""

    def ramp(length: int, at_start: bool, at_end: bool) -> np.ndarray:
        w = np.ones(length, dtype=np.float32)
        if overlap <= 0:
            return w
        r = (np.arange(min(overlap, length), dtype=np.float32) + 0.5) / overlap
        if not at_start:
            w[: len(r)] = np.minimum(w[: len(r)], r)
        if not at_end:
            w[length - len(r):] = np.minimum(w[length - len(r):], r[::-1])
        return w

    wx = ramp(window.width, window.x == 0, window.x1 == width)
    wy = ramp(window.height, window.y == 0, window.y1 == height)
    return wy[:, None] * wx[None, :]


def transport_grid(width: int, height: int, edge: int) -> list[Rect]:
    """Non-overlapping transport tiles of at most edge x edge pixels, row-major."""
    return [
        Rect(x, y, min(edge, width - x), min(edge, height - y))
        for y in range(0, height, edge)
        for x in range(0, width, edge)
    ]


class TileError(ValueError):
    """A transport tile that does not fit its canvas."""
