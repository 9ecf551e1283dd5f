"""Transport tiles on the wire with as few copies as the bytes allow.

A tile is most of what flows between the services, and protobuf costs a copy of its pixels
at each step: parsing, reading `tile.pixels`, wrapping it in another message, serialising.
`StageInput.tile` and `StageOutput.tile` are both field 2, so a serialised StageOutput
holding a tile is, byte for byte, a serialised StageInput holding it: the gateway forwards
such messages without parsing them, and the services read and write them here:

- `encode_tile`: the serialised message from an array, in one copy of the pixels;
- `parse_stage_input`: a `TileView` whose pixels are a view of the received bytes (no copy),
  or, for anything but a plain tile, the parsed StageInput;
- the serialisers pass bytes through and serialise messages.

Everything here is plain protobuf wire format; any protobuf client reads and writes it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tilechain.v1 import stage_pb2, tiles_pb2

from .tiles import Rect

_TILE_KEY = b"\x12"  # field 2, length-delimited: the tile of a StageInput or StageOutput
_PIXELS_KEY = (6 << 3) | 2


@dataclass
class TileView:
    """A received transport tile; pixels may be a view into the message's bytes."""

    canvas_id: int
    x: int
    y: int
    width: int
    height: int
    pixels: Any  # bytes-like

    @property
    def rect(self) -> Rect:
        return Rect(self.x, self.y, self.width, self.height)

    @classmethod
    def of(cls, tile: tiles_pb2.Tile) -> TileView:
        return cls(tile.canvas_id, tile.x, tile.y, tile.width, tile.height, tile.pixels)

    def to_proto(self) -> tiles_pb2.Tile:
        return tiles_pb2.Tile(
            canvas_id=self.canvas_id, x=self.x, y=self.y, width=self.width, height=self.height, pixels=bytes(self.pixels)
        )


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_tile(canvas_id: int, rect: Rect, pixels: np.ndarray) -> bytes:
    """A serialised StageOutput (equally, StageInput) holding one transport tile."""
    if not pixels.flags.c_contiguous:
        pixels = np.ascontiguousarray(pixels)
    head = b"".join(
        _varint(key) + _varint(value)
        for key, value in ((1 << 3, canvas_id), (2 << 3, rect.x), (3 << 3, rect.y), (4 << 3, rect.width), (5 << 3, rect.height))
        if value
    ) + _varint(_PIXELS_KEY) + _varint(pixels.nbytes)
    return b"".join((_TILE_KEY, _varint(len(head) + pixels.nbytes), head, memoryview(pixels).cast("B")))


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def is_tile_message(data: bytes) -> bool:
    """Whether a serialised StageOutput (or StageInput) holds a tile and nothing else."""
    if data[:1] != _TILE_KEY:
        return False
    try:
        length, pos = _read_varint(memoryview(data), 1)
    except (IndexError, ValueError):
        return False
    return pos + length == len(data)


def parse_tile_message(data: bytes) -> TileView | None:
    """The tile of a serialised StageInput/StageOutput that holds just a tile, without copying
    its pixels; None for anything else (the caller parses it with protobuf)."""
    if data[:1] != _TILE_KEY:
        return None
    view = memoryview(data)
    try:
        length, pos = _read_varint(view, 1)
        if pos + length != len(data):
            return None  # more than the tile in the message
        fields = [0, 0, 0, 0, 0]
        pixels: Any = b""
        while pos < len(data):
            key, pos = _read_varint(view, pos)
            number, kind = key >> 3, key & 7
            if 1 <= number <= 5 and kind == 0:
                fields[number - 1], pos = _read_varint(view, pos)
            elif key == _PIXELS_KEY:
                size, pos = _read_varint(view, pos)
                if pos + size > len(data):
                    return None
                pixels, pos = view[pos : pos + size], pos + size
            else:
                return None  # a field this reader does not know: let protobuf have it
    except (IndexError, ValueError):
        return None
    if any(v >= 2**32 for v in fields):
        return None
    return TileView(*fields, pixels)


def parse_stage_input(data: bytes) -> stage_pb2.StageInput | TileView:
    """The request deserialiser of Stage.Process."""
    return parse_tile_message(data) or stage_pb2.StageInput.FromString(data)


def serialize(message: Any) -> bytes:
    """A serialiser that passes already serialised messages through."""
    return message if isinstance(message, bytes) else message.SerializeToString()
