"""A streaming PNG encoder: the image's rows go in top to bottom, a band at a time, and the file
comes out as they go (signature, header, text chunks, compressed data, end), so that no one
holds the whole image to write it. Pillow cannot do this: its encoder takes a whole image.

The file is what Pillow's PNG encoder writes, byte for byte in the chunks around the data and
close in size: 8-bit RGB, RGBA or grey, text chunks before the data (a reader of the first
bytes finds them), each row filtered by the same adaptive choice Pillow (and libpng) makes (of
the five PNG filters, the one whose output has the smallest sum of absolute values as signed
bytes), deflated at zlib's level 6 (Pillow's default) with the strategy for filtered data into IDAT
chunks of up to 64 KiB."""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOUR_TYPES = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type (grey, RGB, RGBA)
IDAT_BYTES = 1 << 16  # compressed bytes per IDAT chunk (Pillow writes 64 KiB blocks too)
FILTER_VALUES = 1 << 18  # filter this many values at a time: bounds the filter's scratch arrays


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


class PngWriter:
    """Write a width x height PNG of `channels` 8-bit channels to `out` (anything with write),
    rows given in order by write_rows(); close() writes the end once every row is in. text:
    keyword -> Latin-1 text, written as tEXt chunks after the header."""

    def __init__(self, out: Any, width: int, height: int, channels: int, text: dict[str, str] | None = None, level: int = 6) -> None:
        if channels not in COLOUR_TYPES:
            raise ValueError(f"a PNG of {channels} channels: only 1 (L), 3 (RGB) or 4 (RGBA)")
        if not (0 < width < 2**31 and 0 < height < 2**31):
            raise ValueError(f"a PNG of {width}x{height} pixels")
        self.out = out
        self.width, self.height, self.channels = width, height, channels
        self.rows_written = 0
        self.previous = np.zeros(width * channels, dtype=np.uint8)  # the row above (zeros above the first)
        # memLevel 9 and the strategy for filtered data, as Pillow's PNG encoder
        self.deflate = zlib.compressobj(level, zlib.DEFLATED, 15, 9, zlib.Z_FILTERED)
        self.pending = bytearray()  # compressed bytes not yet in an IDAT chunk
        header = struct.pack(">IIBBBBB", width, height, 8, COLOUR_TYPES[channels], 0, 0, 0)
        out.write(SIGNATURE + chunk(b"IHDR", header))
        for keyword, value in (text or {}).items():
            out.write(chunk(b"tEXt", keyword.encode("latin-1") + b"\0" + value.encode("latin-1")))

    def write_rows(self, rows: np.ndarray) -> None:
        """The next rows: uint8 (n, width, channels) (or (n, width) for grey)."""
        rows = np.asarray(rows)
        if rows.dtype != np.uint8 or rows.shape[0] == 0 or rows.reshape(rows.shape[0], -1).shape[1] != self.width * self.channels:
            raise ValueError(f"rows of {rows.dtype} {rows.shape} for a {self.width}x{self.height} PNG of {self.channels} channels")
        if self.rows_written + rows.shape[0] > self.height:
            raise ValueError(f"{self.rows_written + rows.shape[0]} rows for a PNG {self.height} rows tall")
        flat = rows.reshape(rows.shape[0], -1)
        step = max(1, FILTER_VALUES // flat.shape[1])
        for start in range(0, flat.shape[0], step):
            part = flat[start : start + step]
            self._emit(self.deflate.compress(filter_rows(part, self.previous, self.channels)))
            self.previous = part[-1].copy()
        self.rows_written += rows.shape[0]

    def close(self) -> None:
        """Finish the data and write the end; ValueError if rows are missing."""
        if self.rows_written != self.height:
            raise ValueError(f"a PNG {self.height} rows tall got {self.rows_written} rows")
        self._emit(self.deflate.flush(), last=True)
        self.out.write(chunk(b"IEND", b""))

    def _emit(self, data: bytes, last: bool = False) -> None:
        self.pending += data
        while len(self.pending) >= IDAT_BYTES or (last and self.pending):
            self.out.write(chunk(b"IDAT", bytes(self.pending[:IDAT_BYTES])))
            del self.pending[:IDAT_BYTES]


def filter_rows(rows: np.ndarray, previous: np.ndarray, bpp: int) -> bytes:
    """Rows (n, row bytes) uint8 as PNG filtered scanlines (a filter type byte, then the row),
    each with the adaptive choice: the filter whose bytes, as signed values, sum smallest in
    absolute value (ties to the lower filter type, as libpng and Pillow)."""
    x = rows.astype(np.int16)
    up = np.empty_like(x)
    up[0] = previous
    up[1:] = x[:-1]
    left = np.zeros_like(x)
    left[:, bpp:] = x[:, :-bpp]
    corner = np.zeros_like(x)
    corner[:, bpp:] = up[:, :-bpp]
    # Paeth: the neighbour (left, up, upper left) nearest to left + up - corner
    to_left, to_up, to_corner = np.abs(up - corner), np.abs(left - corner), np.abs(left + up - 2 * corner)
    paeth = np.where((to_left <= to_up) & (to_left <= to_corner), left, np.where(to_up <= to_corner, up, corner))
    candidates = np.stack([x, x - left, x - up, x - ((left + up) >> 1), x - paeth]).astype(np.uint8)  # mod 256
    signed = candidates.view(np.int8).astype(np.int16)
    cost = np.abs(signed).sum(axis=2, dtype=np.int64)  # (5 filters, n rows)
    choice = cost.argmin(axis=0)
    out = np.empty((rows.shape[0], rows.shape[1] + 1), dtype=np.uint8)
    out[:, 0] = choice
    out[:, 1:] = candidates[choice, np.arange(rows.shape[0])]
    return out.tobytes()
