import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from tilechain.v1 import stage_pb2 as _stage_pb2
from tilechain.v1 import tiles_pb2 as _tiles_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TileReturn(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TILE_RETURN_NONE: _ClassVar[TileReturn]
    TILE_RETURN_FINAL: _ClassVar[TileReturn]
    TILE_RETURN_ALL: _ClassVar[TileReturn]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
TILE_RETURN_NONE: TileReturn
TILE_RETURN_FINAL: TileReturn
TILE_RETURN_ALL: TileReturn
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class ChainStage(_message.Message):
    __slots__ = ("name", "type", "params")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: str
    params: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., type: _Optional[str] = ..., params: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class Chain(_message.Message):
    __slots__ = ("stages", "defaults", "platform")
    STAGES_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    stages: _containers.RepeatedCompositeFieldContainer[ChainStage]
    defaults: _struct_pb2.Struct
    platform: str
    def __init__(self, stages: _Optional[_Iterable[_Union[ChainStage, _Mapping]]] = ..., defaults: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., platform: _Optional[str] = ...) -> None: ...

class Attachment(_message.Message):
    __slots__ = ("stage", "role", "data", "size")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    stage: str
    role: str
    data: bytes
    size: int
    def __init__(self, stage: _Optional[str] = ..., role: _Optional[str] = ..., data: _Optional[bytes] = ..., size: _Optional[int] = ...) -> None: ...

class AttachmentChunk(_message.Message):
    __slots__ = ("stage", "role", "offset", "data")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    stage: str
    role: str
    offset: int
    data: bytes
    def __init__(self, stage: _Optional[str] = ..., role: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadEnd(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ChainUpload(_message.Message):
    __slots__ = ("request", "chunk", "end")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    request: ChainRequest
    chunk: AttachmentChunk
    end: UploadEnd
    def __init__(self, request: _Optional[_Union[ChainRequest, _Mapping]] = ..., chunk: _Optional[_Union[AttachmentChunk, _Mapping]] = ..., end: _Optional[_Union[UploadEnd, _Mapping]] = ...) -> None: ...

class ChainRequest(_message.Message):
    __slots__ = ("chain", "chain_json", "attachments", "return_tiles", "transport_tile", "decode_between_stages", "stages", "defaults", "platform")
    CHAIN_FIELD_NUMBER: _ClassVar[int]
    CHAIN_JSON_FIELD_NUMBER: _ClassVar[int]
    ATTACHMENTS_FIELD_NUMBER: _ClassVar[int]
    RETURN_TILES_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_TILE_FIELD_NUMBER: _ClassVar[int]
    DECODE_BETWEEN_STAGES_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    DEFAULTS_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    chain: Chain
    chain_json: str
    attachments: _containers.RepeatedCompositeFieldContainer[Attachment]
    return_tiles: TileReturn
    transport_tile: int
    decode_between_stages: bool
    stages: _containers.RepeatedCompositeFieldContainer[ChainStage]
    defaults: _struct_pb2.Struct
    platform: str
    def __init__(self, chain: _Optional[_Union[Chain, _Mapping]] = ..., chain_json: _Optional[str] = ..., attachments: _Optional[_Iterable[_Union[Attachment, _Mapping]]] = ..., return_tiles: _Optional[_Union[TileReturn, str]] = ..., transport_tile: _Optional[int] = ..., decode_between_stages: _Optional[bool] = ..., stages: _Optional[_Iterable[_Union[ChainStage, _Mapping]]] = ..., defaults: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., platform: _Optional[str] = ...) -> None: ...

class JobRef(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ("job_id", "state", "code", "message", "artifacts", "stages_total", "stages_done", "attempt", "max_attempts", "queue_position", "queue_length", "gateway", "created_at", "started_at", "ended_at", "stages", "steps", "tiles")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    STAGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    STAGES_DONE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    QUEUE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TILES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    code: int
    message: str
    artifacts: _containers.RepeatedCompositeFieldContainer[_stage_pb2.Artifact]
    stages_total: int
    stages_done: int
    attempt: int
    max_attempts: int
    queue_position: int
    queue_length: int
    gateway: str
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    ended_at: _timestamp_pb2.Timestamp
    stages: ProgressCount
    steps: ProgressCount
    tiles: ProgressCount
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., artifacts: _Optional[_Iterable[_Union[_stage_pb2.Artifact, _Mapping]]] = ..., stages_total: _Optional[int] = ..., stages_done: _Optional[int] = ..., attempt: _Optional[int] = ..., max_attempts: _Optional[int] = ..., queue_position: _Optional[int] = ..., queue_length: _Optional[int] = ..., gateway: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ended_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stages: _Optional[_Union[ProgressCount, _Mapping]] = ..., steps: _Optional[_Union[ProgressCount, _Mapping]] = ..., tiles: _Optional[_Union[ProgressCount, _Mapping]] = ...) -> None: ...

class ProgressCount(_message.Message):
    __slots__ = ("current", "total")
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    current: int
    total: int
    def __init__(self, current: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class QueueEvent(_message.Message):
    __slots__ = ("position", "length", "attempt")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    position: int
    length: int
    attempt: int
    def __init__(self, position: _Optional[int] = ..., length: _Optional[int] = ..., attempt: _Optional[int] = ...) -> None: ...

class StageEvent(_message.Message):
    __slots__ = ("kind", "stage_index", "name", "type", "outputs")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[StageEvent.Kind]
        KIND_STARTED: _ClassVar[StageEvent.Kind]
        KIND_FINISHED: _ClassVar[StageEvent.Kind]
    KIND_UNSPECIFIED: StageEvent.Kind
    KIND_STARTED: StageEvent.Kind
    KIND_FINISHED: StageEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    kind: StageEvent.Kind
    stage_index: int
    name: str
    type: str
    outputs: _containers.RepeatedCompositeFieldContainer[_tiles_pb2.Canvas]
    def __init__(self, kind: _Optional[_Union[StageEvent.Kind, str]] = ..., stage_index: _Optional[int] = ..., name: _Optional[str] = ..., type: _Optional[str] = ..., outputs: _Optional[_Iterable[_Union[_tiles_pb2.Canvas, _Mapping]]] = ...) -> None: ...

class StageProgress(_message.Message):
    __slots__ = ("stage_index", "name", "progress")
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    stage_index: int
    name: str
    progress: _stage_pb2.Progress
    def __init__(self, stage_index: _Optional[int] = ..., name: _Optional[str] = ..., progress: _Optional[_Union[_stage_pb2.Progress, _Mapping]] = ...) -> None: ...

class TileEvent(_message.Message):
    __slots__ = ("stage_index", "name", "canvas", "tile")
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CANVAS_FIELD_NUMBER: _ClassVar[int]
    TILE_FIELD_NUMBER: _ClassVar[int]
    stage_index: int
    name: str
    canvas: _tiles_pb2.Canvas
    tile: _tiles_pb2.Tile
    def __init__(self, stage_index: _Optional[int] = ..., name: _Optional[str] = ..., canvas: _Optional[_Union[_tiles_pb2.Canvas, _Mapping]] = ..., tile: _Optional[_Union[_tiles_pb2.Tile, _Mapping]] = ...) -> None: ...

class NoticeEvent(_message.Message):
    __slots__ = ("stage_index", "name", "message")
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    stage_index: int
    name: str
    message: str
    def __init__(self, stage_index: _Optional[int] = ..., name: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "stage", "progress", "tile", "artifact", "notice", "status", "queue")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    TILE_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    stage: StageEvent
    progress: StageProgress
    tile: TileEvent
    artifact: _stage_pb2.Artifact
    notice: NoticeEvent
    status: JobStatus
    queue: QueueEvent
    def __init__(self, job_id: _Optional[str] = ..., stage: _Optional[_Union[StageEvent, _Mapping]] = ..., progress: _Optional[_Union[StageProgress, _Mapping]] = ..., tile: _Optional[_Union[TileEvent, _Mapping]] = ..., artifact: _Optional[_Union[_stage_pb2.Artifact, _Mapping]] = ..., notice: _Optional[_Union[NoticeEvent, _Mapping]] = ..., status: _Optional[_Union[JobStatus, _Mapping]] = ..., queue: _Optional[_Union[QueueEvent, _Mapping]] = ...) -> None: ...

class ListStagesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListStagesResponse(_message.Message):
    __slots__ = ("catalogs", "families_down")
    CATALOGS_FIELD_NUMBER: _ClassVar[int]
    FAMILIES_DOWN_FIELD_NUMBER: _ClassVar[int]
    catalogs: _containers.RepeatedCompositeFieldContainer[_stage_pb2.StageCatalog]
    families_down: _containers.RepeatedCompositeFieldContainer[FamilyDown]
    def __init__(self, catalogs: _Optional[_Iterable[_Union[_stage_pb2.StageCatalog, _Mapping]]] = ..., families_down: _Optional[_Iterable[_Union[FamilyDown, _Mapping]]] = ...) -> None: ...

class FamilyDown(_message.Message):
    __slots__ = ("family", "address", "error")
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    family: str
    address: str
    error: str
    def __init__(self, family: _Optional[str] = ..., address: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...
