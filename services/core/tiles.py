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


def plan_windows(width: int, height: int, max_tile: int, overlap: int, order: str = "grid", row_shift: int = 0) -> list[Rect]:
    """Processing tiles covering a width x height canvas, in the order they should run.
    row_shift (without overlap): rows shifted up as a transport grid's are (Rows), so that each
    row of processing tiles lies within one row of the output's transport tiles."""
    if max_tile <= 0:
        return [Rect(0, 0, width, height)]
    if overlap >= max_tile:
        raise ValueError(f"overlap {overlap} must be smaller than the tile {max_tile}")
    xs = _axis_starts(width, max_tile, overlap)
    if overlap == 0 and row_shift % max_tile:
        rows = Rows(max_tile, row_shift % max_tile, height)
        bands = [(rows.top(r), rows.top(r + 1)) for r in range(rows.count)]
    else:
        bands = [(y, min(y + max_tile, height)) for y in _axis_starts(height, max_tile, overlap)]
    grid = [[Rect(x, y, min(max_tile, width - x), y1 - y) for x in xs] for y, y1 in bands]
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


@dataclass(frozen=True)
class Rows:
    """The rows of a transport grid (tiles_pb2.TileGrid): the first starts at 0, the others at
    k * edge - shift for k >= 1."""

    edge: int
    shift: int
    height: int

    @property
    def count(self) -> int:
        return -(-(self.height + self.shift) // self.edge)

    def top(self, row: int) -> int:
        return 0 if row <= 0 else min(self.height, row * self.edge - self.shift)

    def of(self, y: int) -> int:
        """The row holding pixel row y."""
        return (y + self.shift) // self.edge

    def span(self, y: int, y1: int) -> range:
        """The rows that pixel rows y..y1-1 touch."""
        return range(self.of(y), self.of(y1 - 1) + 1)


def transport_grid(width: int, height: int, edge: int, row_shift: int = 0) -> list[Rect]:
    """Non-overlapping transport tiles of at most edge x edge pixels, row-major; rows shifted
    up by row_shift (Rows)."""
    rows = Rows(edge, row_shift, height)
    return [
        Rect(x, rows.top(r), min(edge, width - x), rows.top(r + 1) - rows.top(r))
        for r in range(rows.count)
        for x in range(0, width, edge)
    ]


class TileError(ValueError):
    """A transport tile that does not fit its canvas."""
