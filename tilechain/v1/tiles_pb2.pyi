from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PixelFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PIXEL_FORMAT_UNSPECIFIED: _ClassVar[PixelFormat]
    PIXEL_FORMAT_RGB8: _ClassVar[PixelFormat]
    PIXEL_FORMAT_RGBA8: _ClassVar[PixelFormat]
    PIXEL_FORMAT_L8: _ClassVar[PixelFormat]
    PIXEL_FORMAT_LATENT_F32: _ClassVar[PixelFormat]

class CanvasRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CANVAS_ROLE_UNSPECIFIED: _ClassVar[CanvasRole]
    CANVAS_ROLE_IMAGE: _ClassVar[CanvasRole]
    CANVAS_ROLE_MASK: _ClassVar[CanvasRole]
    CANVAS_ROLE_CONTROL: _ClassVar[CanvasRole]
PIXEL_FORMAT_UNSPECIFIED: PixelFormat
PIXEL_FORMAT_RGB8: PixelFormat
PIXEL_FORMAT_RGBA8: PixelFormat
PIXEL_FORMAT_L8: PixelFormat
PIXEL_FORMAT_LATENT_F32: PixelFormat
CANVAS_ROLE_UNSPECIFIED: CanvasRole
CANVAS_ROLE_IMAGE: CanvasRole
CANVAS_ROLE_MASK: CanvasRole
CANVAS_ROLE_CONTROL: CanvasRole

class Canvas(_message.Message):
    __slots__ = ("id", "width", "height", "format", "role", "index", "attached", "provenance", "latent", "grid")
    ID_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    LATENT_FIELD_NUMBER: _ClassVar[int]
    GRID_FIELD_NUMBER: _ClassVar[int]
    id: int
    width: int
    height: int
    format: PixelFormat
    role: CanvasRole
    index: int
    attached: bool
    provenance: _struct_pb2.Struct
    latent: Latent
    grid: TileGrid
    def __init__(self, id: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., format: _Optional[_Union[PixelFormat, str]] = ..., role: _Optional[_Union[CanvasRole, str]] = ..., index: _Optional[int] = ..., attached: _Optional[bool] = ..., provenance: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., latent: _Optional[_Union[Latent, _Mapping]] = ..., grid: _Optional[_Union[TileGrid, _Mapping]] = ...) -> None: ...

class TileGrid(_message.Message):
    __slots__ = ("edge", "row_shift")
    EDGE_FIELD_NUMBER: _ClassVar[int]
    ROW_SHIFT_FIELD_NUMBER: _ClassVar[int]
    edge: int
    row_shift: int
    def __init__(self, edge: _Optional[int] = ..., row_shift: _Optional[int] = ...) -> None: ...

class Latent(_message.Message):
    __slots__ = ("space", "channels", "scale")
    SPACE_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    space: str
    channels: int
    scale: int
    def __init__(self, space: _Optional[str] = ..., channels: _Optional[int] = ..., scale: _Optional[int] = ...) -> None: ...

class Tile(_message.Message):
    __slots__ = ("canvas_id", "x", "y", "width", "height", "pixels")
    CANVAS_ID_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    canvas_id: int
    x: int
    y: int
    width: int
    height: int
    pixels: bytes
    def __init__(self, canvas_id: _Optional[int] = ..., x: _Optional[int] = ..., y: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., pixels: _Optional[bytes] = ...) -> None: ...
