from google.protobuf import struct_pb2 as _struct_pb2
from tilechain.v1 import tiles_pb2 as _tiles_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ParamType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PARAM_TYPE_UNSPECIFIED: _ClassVar[ParamType]
    PARAM_TYPE_INT: _ClassVar[ParamType]
    PARAM_TYPE_FLOAT: _ClassVar[ParamType]
    PARAM_TYPE_BOOL: _ClassVar[ParamType]
    PARAM_TYPE_STRING: _ClassVar[ParamType]
    PARAM_TYPE_LIST: _ClassVar[ParamType]
    PARAM_TYPE_OBJECT: _ClassVar[ParamType]

class TileOrder(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TILE_ORDER_UNSPECIFIED: _ClassVar[TileOrder]
    TILE_ORDER_GRID: _ClassVar[TileOrder]
    TILE_ORDER_SPIRAL: _ClassVar[TileOrder]
PARAM_TYPE_UNSPECIFIED: ParamType
PARAM_TYPE_INT: ParamType
PARAM_TYPE_FLOAT: ParamType
PARAM_TYPE_BOOL: ParamType
PARAM_TYPE_STRING: ParamType
PARAM_TYPE_LIST: ParamType
PARAM_TYPE_OBJECT: ParamType
TILE_ORDER_UNSPECIFIED: TileOrder
TILE_ORDER_GRID: TileOrder
TILE_ORDER_SPIRAL: TileOrder

class StageStart(_message.Message):
    __slots__ = ("job_id", "name", "type", "params", "inputs", "transport_tile", "latent_output", "attempt")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_TILE_FIELD_NUMBER: _ClassVar[int]
    LATENT_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    name: str
    type: str
    params: _struct_pb2.Struct
    inputs: _containers.RepeatedCompositeFieldContainer[_tiles_pb2.Canvas]
    transport_tile: int
    latent_output: bool
    attempt: int
    def __init__(self, job_id: _Optional[str] = ..., name: _Optional[str] = ..., type: _Optional[str] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., inputs: _Optional[_Iterable[_Union[_tiles_pb2.Canvas, _Mapping]]] = ..., transport_tile: _Optional[int] = ..., latent_output: _Optional[bool] = ..., attempt: _Optional[int] = ...) -> None: ...

class InputEnd(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StageInput(_message.Message):
    __slots__ = ("start", "tile", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    TILE_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: StageStart
    tile: _tiles_pb2.Tile
    end: InputEnd
    def __init__(self, start: _Optional[_Union[StageStart, _Mapping]] = ..., tile: _Optional[_Union[_tiles_pb2.Tile, _Mapping]] = ..., end: _Optional[_Union[InputEnd, _Mapping]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("unit", "done", "total")
    UNIT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    unit: str
    done: int
    total: int
    def __init__(self, unit: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("stage", "uri", "path", "format", "width", "height", "index", "size_bytes", "sha256")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    stage: str
    uri: str
    path: str
    format: str
    width: int
    height: int
    index: int
    size_bytes: int
    sha256: str
    def __init__(self, stage: _Optional[str] = ..., uri: _Optional[str] = ..., path: _Optional[str] = ..., format: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., index: _Optional[int] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class Notice(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class StageDone(_message.Message):
    __slots__ = ("tiles_processed", "tiles_emitted")
    TILES_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    TILES_EMITTED_FIELD_NUMBER: _ClassVar[int]
    tiles_processed: int
    tiles_emitted: int
    def __init__(self, tiles_processed: _Optional[int] = ..., tiles_emitted: _Optional[int] = ...) -> None: ...

class StageOutput(_message.Message):
    __slots__ = ("canvas", "tile", "progress", "artifact", "notice", "done")
    CANVAS_FIELD_NUMBER: _ClassVar[int]
    TILE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    canvas: _tiles_pb2.Canvas
    tile: _tiles_pb2.Tile
    progress: Progress
    artifact: Artifact
    notice: Notice
    done: StageDone
    def __init__(self, canvas: _Optional[_Union[_tiles_pb2.Canvas, _Mapping]] = ..., tile: _Optional[_Union[_tiles_pb2.Tile, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., artifact: _Optional[_Union[Artifact, _Mapping]] = ..., notice: _Optional[_Union[Notice, _Mapping]] = ..., done: _Optional[_Union[StageDone, _Mapping]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ParamSpec(_message.Message):
    __slots__ = ("name", "type", "default", "required", "minimum", "maximum", "choices", "doc", "keywords")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    MINIMUM_FIELD_NUMBER: _ClassVar[int]
    MAXIMUM_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    KEYWORDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: ParamType
    default: _struct_pb2.Value
    required: bool
    minimum: float
    maximum: float
    choices: _containers.RepeatedCompositeFieldContainer[_struct_pb2.Value]
    doc: str
    keywords: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., type: _Optional[_Union[ParamType, str]] = ..., default: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., required: _Optional[bool] = ..., minimum: _Optional[float] = ..., maximum: _Optional[float] = ..., choices: _Optional[_Iterable[_Union[_struct_pb2.Value, _Mapping]]] = ..., doc: _Optional[str] = ..., keywords: _Optional[_Iterable[str]] = ...) -> None: ...

class StageSpec(_message.Message):
    __slots__ = ("type", "family", "doc", "params", "max_tile", "overlap", "needs_whole_canvas", "order", "attachments", "required_attachments", "makes_latents", "takes_latents", "unavailable", "requires", "streams")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_TILE_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_FIELD_NUMBER: _ClassVar[int]
    NEEDS_WHOLE_CANVAS_FIELD_NUMBER: _ClassVar[int]
    ORDER_FIELD_NUMBER: _ClassVar[int]
    ATTACHMENTS_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_ATTACHMENTS_FIELD_NUMBER: _ClassVar[int]
    MAKES_LATENTS_FIELD_NUMBER: _ClassVar[int]
    TAKES_LATENTS_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_FIELD_NUMBER: _ClassVar[int]
    STREAMS_FIELD_NUMBER: _ClassVar[int]
    type: str
    family: str
    doc: str
    params: _containers.RepeatedCompositeFieldContainer[ParamSpec]
    max_tile: int
    overlap: int
    needs_whole_canvas: bool
    order: TileOrder
    attachments: _containers.RepeatedScalarFieldContainer[str]
    required_attachments: _containers.RepeatedScalarFieldContainer[str]
    makes_latents: bool
    takes_latents: bool
    unavailable: str
    requires: _containers.RepeatedScalarFieldContainer[str]
    streams: bool
    def __init__(self, type: _Optional[str] = ..., family: _Optional[str] = ..., doc: _Optional[str] = ..., params: _Optional[_Iterable[_Union[ParamSpec, _Mapping]]] = ..., max_tile: _Optional[int] = ..., overlap: _Optional[int] = ..., needs_whole_canvas: _Optional[bool] = ..., order: _Optional[_Union[TileOrder, str]] = ..., attachments: _Optional[_Iterable[str]] = ..., required_attachments: _Optional[_Iterable[str]] = ..., makes_latents: _Optional[bool] = ..., takes_latents: _Optional[bool] = ..., unavailable: _Optional[str] = ..., requires: _Optional[_Iterable[str]] = ..., streams: _Optional[bool] = ...) -> None: ...

class StageCatalog(_message.Message):
    __slots__ = ("family", "stages")
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    family: str
    stages: _containers.RepeatedCompositeFieldContainer[StageSpec]
    def __init__(self, family: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[StageSpec, _Mapping]]] = ...) -> None: ...

class PlanResult(_message.Message):
    __slots__ = ("outputs", "emits_latent", "accepts_latent")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    EMITS_LATENT_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_LATENT_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.RepeatedCompositeFieldContainer[_tiles_pb2.Canvas]
    emits_latent: str
    accepts_latent: str
    def __init__(self, outputs: _Optional[_Iterable[_Union[_tiles_pb2.Canvas, _Mapping]]] = ..., emits_latent: _Optional[str] = ..., accepts_latent: _Optional[str] = ...) -> None: ...

class FinishRequest(_message.Message):
    __slots__ = ("job_id", "attempt", "commit")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    attempt: int
    commit: bool
    def __init__(self, job_id: _Optional[str] = ..., attempt: _Optional[int] = ..., commit: _Optional[bool] = ...) -> None: ...

class FinishResult(_message.Message):
    __slots__ = ("artifacts",)
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    artifacts: _containers.RepeatedCompositeFieldContainer[Artifact]
    def __init__(self, artifacts: _Optional[_Iterable[_Union[Artifact, _Mapping]]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("wait_idle", "reset_peaks")
    WAIT_IDLE_FIELD_NUMBER: _ClassVar[int]
    RESET_PEAKS_FIELD_NUMBER: _ClassVar[int]
    wait_idle: bool
    reset_peaks: bool
    def __init__(self, wait_idle: _Optional[bool] = ..., reset_peaks: _Optional[bool] = ...) -> None: ...

class ServiceStats(_message.Message):
    __slots__ = ("active_streams", "streams_started", "streams_finished", "streams_cancelled", "streams_failed", "tiles_processed", "steps_run", "vae_decodes", "vae_encodes", "peak_active_streams", "peak_input_bytes", "peak_output_bytes", "peak_ready_tiles")
    ACTIVE_STREAMS_FIELD_NUMBER: _ClassVar[int]
    STREAMS_STARTED_FIELD_NUMBER: _ClassVar[int]
    STREAMS_FINISHED_FIELD_NUMBER: _ClassVar[int]
    STREAMS_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    STREAMS_FAILED_FIELD_NUMBER: _ClassVar[int]
    TILES_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    STEPS_RUN_FIELD_NUMBER: _ClassVar[int]
    VAE_DECODES_FIELD_NUMBER: _ClassVar[int]
    VAE_ENCODES_FIELD_NUMBER: _ClassVar[int]
    PEAK_ACTIVE_STREAMS_FIELD_NUMBER: _ClassVar[int]
    PEAK_INPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_OUTPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_READY_TILES_FIELD_NUMBER: _ClassVar[int]
    active_streams: int
    streams_started: int
    streams_finished: int
    streams_cancelled: int
    streams_failed: int
    tiles_processed: int
    steps_run: int
    vae_decodes: int
    vae_encodes: int
    peak_active_streams: int
    peak_input_bytes: int
    peak_output_bytes: int
    peak_ready_tiles: int
    def __init__(self, active_streams: _Optional[int] = ..., streams_started: _Optional[int] = ..., streams_finished: _Optional[int] = ..., streams_cancelled: _Optional[int] = ..., streams_failed: _Optional[int] = ..., tiles_processed: _Optional[int] = ..., steps_run: _Optional[int] = ..., vae_decodes: _Optional[int] = ..., vae_encodes: _Optional[int] = ..., peak_active_streams: _Optional[int] = ..., peak_input_bytes: _Optional[int] = ..., peak_output_bytes: _Optional[int] = ..., peak_ready_tiles: _Optional[int] = ...) -> None: ...
