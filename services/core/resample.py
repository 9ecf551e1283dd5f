"""Separable resampling whose result for an output pixel depends only on that pixel's global
position and the input pixels, never on how the canvas was tiled: tiled resizes are
bit-identical to untiled ones. (Pillow's resize with a source box is not: its float box
arithmetic shifts taps by a rounding error, ±1 for smooth filters and whole pixels for
nearest.) The filters are Pillow's (bilinear triangle, bicubic a = -0.5, lanczos-3), with
antialiasing when shrinking, and the same edge handling (taps outside the canvas dropped and
the weights renormalised).

The arithmetic is Pillow's too: fixed-point integer weights, an 8-bit intermediate between
the horizontal and the vertical pass, round half up. The weights have PRECISION fraction bits
(Pillow uses 22 with int32 sums; we use 15, so results agree with Pillow within one level in
rare pixels): with 15 bits, 255 x the sum of a row's absolute weights stays below 2**24, so
every partial sum of products is an integer a float32 holds exactly, and the sums can run as
float32 matrix products (BLAS, in any order and any blocking) and still be exact. That is what
makes it both fast and independent of the tiling.

Each pass multiplies by a dense block of weights per run of output pixels (a "tap block": the
run's weights over the input pixels it reads). `StreamingResize` runs a resize as input tiles
arrive: the horizontal pass as soon as the input columns under a block of output columns are
in, the vertical pass as soon as the rows under a band of output rows are, holding only the
input tiles and reduced rows still needed."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import numpy as np

from tilechain.v1 import tiles_pb2

from .stage import TileWork
from .tiles import Rect

SUPPORT: dict[str, float] = {"nearest": 0.5, "bilinear": 1.0, "bicubic": 2.0, "lanczos": 3.0}
FILTERS = tuple(SUPPORT)
PRECISION = 15  # fraction bits of the fixed-point weights (see the module doc)
_HALF = float(1 << (PRECISION - 1))
_SCALE = 1.0 / (1 << PRECISION)
_EXACT = 2**24  # float32 holds every integer below this exactly


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
    """Input indices (count, taps) and fixed-point weights for output pixels
    start..start+count-1; weights of taps outside the input are 0."""
    out = np.arange(start, start + count, dtype=np.int64)
    if method == "nearest":
        # the input pixel under the output pixel's centre, in exact integer arithmetic
        index = ((2 * out + 1) * in_size // (2 * out_size))[:, None]
        return index, np.full((count, 1), 1 << PRECISION, dtype=np.int64)
    scale = in_size / out_size
    stretch = max(scale, 1.0)
    support = SUPPORT[method] * stretch
    center = (out + 0.5) * scale
    first = np.floor(center - support + 0.5).astype(np.int64)
    index = first[:, None] + np.arange(2 * math.ceil(support) + 1)
    weight = _kernel(method, (index - center[:, None] + 0.5) / stretch)
    weight[(index < 0) | (index >= in_size)] = 0.0
    weight /= weight.sum(axis=1, keepdims=True)
    scaled = weight * (1 << PRECISION)
    fixed = np.where(scaled < 0, np.ceil(scaled - 0.5), np.floor(scaled + 0.5)).astype(np.int64)  # Pillow's rounding
    if 255 * int(np.abs(fixed).sum(axis=1).max()) >= _EXACT:  # cannot happen for these filters
        raise AssertionError(f"{method} weights too large for exact float32 sums")
    return index, fixed


@dataclass(frozen=True)
class TapBlock:
    """The weights of output pixels start..start+count-1 over input pixels lo..hi-1:
    out[start + j] = sum_i matrix[i, j] * in[lo + i] / 2**PRECISION."""

    start: int
    count: int
    lo: int
    hi: int
    matrix: np.ndarray = field(repr=False)  # (hi - lo, count) float32, integer values


def _run_length(method: str, in_size: int, out_size: int) -> int:
    """Output pixels per tap block: about 256 input pixels' worth, 8..128."""
    if method == "nearest" or in_size <= out_size:
        return 128
    return max(8, min(128, int(256 * out_size / in_size)))


def tap_blocks(method: str, start: int, count: int, in_size: int, out_size: int) -> list[TapBlock]:
    """Tap blocks covering output pixels start..start+count-1. Blocks start at multiples of
    the run length, so two windows of one resize share their blocks' boundaries (not needed
    for exactness, which any blocking has, but it keeps the blocks of streaming reusable)."""
    index, fixed = _taps(method, start, count, in_size, out_size)
    run = _run_length(method, in_size, out_size)
    blocks = []
    edges = sorted({start, start + count, *range((start // run + 1) * run, start + count, run)})
    for b0, b1 in zip(edges, edges[1:]):
        rows = slice(b0 - start, b1 - start)
        idx, w = index[rows], fixed[rows]
        live = w != 0
        lo, hi = int(idx[live].min()), int(idx[live].max()) + 1
        matrix = np.zeros((hi - lo, b1 - b0), dtype=np.float32)
        column = np.broadcast_to(np.arange(b1 - b0)[:, None], idx.shape)
        matrix[idx[live] - lo, column[live]] = w[live]
        blocks.append(TapBlock(b0, b1 - b0, lo, hi, matrix))
    return blocks


def _round(sums: np.ndarray) -> np.ndarray:
    """Fixed-point sums (float32, exact integers) -> pixel values 0..255, in place."""
    sums += _HALF
    sums *= _SCALE  # a power of two: exact
    np.floor(sums, out=sums)
    return np.clip(sums, 0.0, 255.0, out=sums)


def horizontal(pixels: np.ndarray, origin: int, blocks: list[TapBlock]) -> np.ndarray:
    """The horizontal pass over (R, W, C) uint8 pixels whose column 0 is input column origin:
    (R, C, n) float32 pixel values for the blocks' output columns (n in all, in order)."""
    rows, width, chans = pixels.shape
    planar = np.empty((rows, chans, width), dtype=np.float32)
    planar[...] = pixels.transpose(0, 2, 1)
    flat = planar.reshape(rows * chans, width)
    start = blocks[0].start
    out = np.empty((rows * chans, blocks[-1].start + blocks[-1].count - start), dtype=np.float32)
    for b in blocks:
        out[:, b.start - start : b.start - start + b.count] = flat[:, b.lo - origin : b.hi - origin] @ b.matrix
    return _round(out).reshape(rows, chans, -1)


def vertical(planar: np.ndarray, origin: int, blocks: list[TapBlock]) -> np.ndarray:
    """The vertical pass over (R, C, W) float32 pixel values whose row 0 is input row origin:
    (n, C, W) float32 pixel values for the blocks' output rows."""
    rows, chans, width = planar.shape
    flat = planar.reshape(rows, chans * width)
    start = blocks[0].start
    out = np.empty((blocks[-1].start + blocks[-1].count - start, chans * width), dtype=np.float32)
    for b in blocks:
        out[b.start - start : b.start - start + b.count] = b.matrix.T @ flat[b.lo - origin : b.hi - origin]
    return _round(out).reshape(-1, chans, width)


def to_pixels(planar: np.ndarray) -> np.ndarray:
    """(H, C, W) float32 pixel values -> (H, W, C) uint8."""
    height, chans, width = planar.shape
    out = np.empty((height, width, chans), dtype=np.uint8)
    out[...] = planar.transpose(0, 2, 1)
    return out


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
    if method == "nearest":
        x_index, _ = _taps(method, window.x, window.width, in_w, out_w)
        y_index, _ = _taps(method, window.y, window.height, in_h, out_h)
        return pixels[y_index[:, 0] - pixels_rect.y][:, x_index[:, 0] - pixels_rect.x]
    x_blocks = tap_blocks(method, window.x, window.width, in_w, out_w)
    y_blocks = tap_blocks(method, window.y, window.height, in_h, out_h)
    x0, x1 = x_blocks[0].lo, max(b.hi for b in x_blocks)
    y0, y1 = y_blocks[0].lo, max(b.hi for b in y_blocks)
    if x0 < pixels_rect.x or y0 < pixels_rect.y or x1 > pixels_rect.x1 or y1 > pixels_rect.y1:
        raise ValueError(f"resize of window {window} reads {Rect(x0, y0, x1 - x0, y1 - y0)}, outside the pixels given {pixels_rect}")
    rows = pixels[y0 - pixels_rect.y : y1 - pixels_rect.y, x0 - pixels_rect.x : x1 - pixels_rect.x]
    return to_pixels(vertical(horizontal(rows, x0, x_blocks), y0, y_blocks))


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


# --- streaming -------------------------------------------------------------------------------


class StreamingResize:
    """One resize run on input tiles as they arrive (any partition, any order), giving back
    finished full-width bands of output rows. Holds only the input tiles whose columns some
    horizontal block has yet to reduce, and the horizontally reduced rows some band of output
    rows has yet to read: with row-major input, a few tiles and a few hundred narrow rows,
    whatever the image size. The result is bit-identical to resize()."""

    BAND = 64  # rows of reduced (horizontal pass) storage per chunk

    def __init__(self, in_w: int, in_h: int, chans: int, out_w: int, out_h: int, method: str) -> None:
        self.in_w, self.in_h, self.chans, self.out_w, self.out_h = in_w, in_h, chans, out_w, out_h
        self.x_blocks = tap_blocks(method, 0, out_w, in_w, out_w)
        self.y_blocks = tap_blocks(method, 0, out_h, in_h, out_h)
        self._x_lo = [b.lo for b in self.x_blocks]
        self._x_hi = [b.hi for b in self.x_blocks]
        # input pixels seen per (horizontal block, input row), in chunks of BAND rows kept while
        # some block has rows of the chunk to reduce: a block's row is ready when all its columns are in
        self._seen: dict[int, np.ndarray] = {}
        self._width = np.array([b.hi - b.lo for b in self.x_blocks], dtype=np.int32)
        self._tiles: dict[int, list] = {}   # id -> [rect, pixels, pixel-rows still to reduce]
        self._next_tile = 0
        # reduced rows: chunk index -> (BAND, C, out_w) uint8 (exact: the 8-bit intermediate);
        # how many horizontal blocks are done, per input row
        self._reduced: dict[int, np.ndarray] = {}
        self._blocks_done = np.zeros(in_h, dtype=np.int32)
        self._y_lo = np.array([b.lo for b in self.y_blocks])
        self._y_hi = np.array([b.hi for b in self.y_blocks])
        self._rows_missing = self._y_hi - self._y_lo  # reduced rows each output band still waits for
        # output bands reading each chunk of reduced rows: the chunk goes once they are done
        chunks = -(-in_h // self.BAND)
        self._chunk_readers = np.zeros(chunks, dtype=np.int64)
        for lo, hi in zip(self._y_lo, self._y_hi):
            self._chunk_readers[lo // self.BAND : (hi - 1) // self.BAND + 1] += 1

    @property
    def held_bytes(self) -> int:
        return sum(t[1].nbytes for t in self._tiles.values()) + sum(a.nbytes for a in (*self._reduced.values(), *self._seen.values()))

    def add(self, rect: Rect, pixels: np.ndarray) -> list[tuple[Rect, np.ndarray]]:
        """Take one input tile; return the output bands it finished, as (rect, (h, out_w, C) uint8)."""
        blocks = self._blocks_over(rect)
        if not blocks:
            return []
        self._tiles[self._next_tile] = [rect, pixels, rect.height * len(blocks)]  # pixel rows still to reduce
        self._next_tile += 1
        ready: list[tuple[int, int, int]] = []  # (block, row0, row1): runs whose columns are all in
        for b, overlap in blocks:
            complete = []
            for c0 in range(rect.y // self.BAND * self.BAND, rect.y1, self.BAND):
                chunk = self._seen.get(c0)
                if chunk is None:
                    chunk = self._seen[c0] = np.zeros((len(self.x_blocks), self.BAND), dtype=np.int32)
                seen = chunk[b, max(rect.y, c0) - c0 : min(rect.y1, c0 + self.BAND) - c0]
                seen += overlap
                complete.append(np.flatnonzero(seen == self._width[b]) + max(rect.y, c0))
            ready += [(b, r0, r1) for r0, r1 in _runs(np.concatenate(complete))]
        bands: list[tuple[Rect, np.ndarray]] = []
        for b, r0, r1 in ready:
            bands += self._reduce(b, r0, r1)
        return bands

    def _blocks_over(self, rect: Rect) -> list[tuple[int, int]]:
        """The horizontal blocks that read columns of rect, with how many of them."""
        first = bisect.bisect_right(self._x_hi, rect.x)
        last = bisect.bisect_left(self._x_lo, rect.x1)
        out = []
        for b in range(first, last):
            overlap = min(rect.x1, self._x_hi[b]) - max(rect.x, self._x_lo[b])
            if overlap > 0:
                out.append((b, overlap))
        return out

    def _reduce(self, b: int, r0: int, r1: int) -> list[tuple[Rect, np.ndarray]]:
        """The horizontal pass of block b over input rows r0..r1-1 (all their columns are in)."""
        block = self.x_blocks[b]
        span = Rect(block.lo, r0, block.hi - block.lo, r1 - r0)
        gathered = np.empty((span.height, span.width, self.chans), dtype=np.uint8)
        for key in list(self._tiles):
            entry = self._tiles[key]
            inter = entry[0].intersection(span)
            if inter is None:
                continue
            gathered[inter.relative_to(span).slices] = entry[1][inter.relative_to(entry[0]).slices]
            entry[2] -= inter.height
            if entry[2] == 0:
                del self._tiles[key]
        reduced = horizontal(gathered, block.lo, [block])  # (rows, C, count)
        for c0 in range(r0 // self.BAND * self.BAND, r1, self.BAND):
            chunk = self._reduced.get(c0 // self.BAND)
            if chunk is None:
                chunk = self._reduced[c0 // self.BAND] = np.empty((self.BAND, self.chans, self.out_w), dtype=np.uint8)
            a, e = max(r0, c0), min(r1, c0 + self.BAND)
            chunk[a - c0 : e - c0, :, block.start : block.start + block.count] = reduced[a - r0 : e - r0]
        done = self._blocks_done[r0:r1]
        done += 1
        complete = np.flatnonzero(done == len(self.x_blocks)) + r0
        for c0 in range(r0 // self.BAND * self.BAND, r1, self.BAND):  # chunks whose rows are all reduced
            if c0 in self._seen and (self._blocks_done[c0 : c0 + self.BAND] == len(self.x_blocks)).all():
                del self._seen[c0]
        return self._rows_complete(complete)

    def _rows_complete(self, rows: np.ndarray) -> list[tuple[Rect, np.ndarray]]:
        bands = []
        for r0, r1 in _runs(rows):
            first = int(np.searchsorted(self._y_hi, r0, side="right"))
            last = int(np.searchsorted(self._y_lo, r1, side="left"))
            for k in range(first, last):
                got = min(r1, self._y_hi[k]) - max(r0, self._y_lo[k])
                if got <= 0:
                    continue
                self._rows_missing[k] -= got
                if self._rows_missing[k] == 0:
                    bands.append(self._band(k))
        return bands

    def _band(self, k: int) -> tuple[Rect, np.ndarray]:
        """The vertical pass of output band k (its reduced rows are all done)."""
        block = self.y_blocks[k]
        rows = np.empty((block.hi - block.lo, self.chans, self.out_w), dtype=np.float32)
        for c in range(block.lo // self.BAND, (block.hi - 1) // self.BAND + 1):
            c0 = c * self.BAND
            a, e = max(block.lo, c0), min(block.hi, c0 + self.BAND)
            rows[a - block.lo : e - block.lo] = self._reduced[c][a - c0 : e - c0]
            self._chunk_readers[c] -= 1
            if self._chunk_readers[c] == 0:
                del self._reduced[c]
        out = to_pixels(vertical(rows, block.lo, [block]))
        return Rect(0, block.start, self.out_w, block.count), out


def _runs(sorted_rows: np.ndarray) -> list[tuple[int, int]]:
    """Runs of consecutive integers in a sorted array, as (first, last + 1)."""
    if len(sorted_rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(sorted_rows)]))
    return [(int(sorted_rows[s]), int(sorted_rows[e - 1]) + 1) for s, e in zip(starts, ends)]
