"""Turning a ChainRequest into a checked plan before anything runs: parse the chain, check every
stage's type and params against its service's catalog, decode the attachments, then ask each
service to plan its stage so that sizes and masks are checked too."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

import grpc

from tilechain.services.core.codecs import FORMAT_FOR_CHANNELS, ImageDecodeError, image_size
from tilechain.services.core.config import MAX_CHAIN_BYTES, Settings, plan_timeout, transport_tile_problem
from tilechain.services.core.errors import public_text
from tilechain.services.core.images import Buffer, ImageHeader, image_tiles, limits_message, read_header
from tilechain.services.core.params import (
    MAX_PARAM_DEPTH,
    Param,
    ParamError,
    dict_to_struct,
    shown,
    struct_to_dict,
    validate_params,
)
from tilechain.services.core.servicer import param_message
from tilechain.services.core.stage import ROLE_NAMES, stage_label
from tilechain.v1 import gateway_pb2, stage_pb2, tiles_pb2

from . import dialect
from .families import Family, FamilyUnavailable, family_of

log = logging.getLogger("tilechain.gateway")


class ChainError(Exception):
    """A request the gateway refuses, with the status to refuse it with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ChainError:
    return ChainError(grpc.StatusCode.INVALID_ARGUMENT, message)


TILE_BATCH_BYTES = 4 * 1024 * 1024  # decoded tiles handed over from the decoding thread at once


@dataclass
class AttachedImage:
    """An attached image file, checked by its header only. Its pixels exist only while its
    tiles stream to the stage, a band at a time (services/core/images.py)."""

    label: str   # the stage's
    role: str
    data: Buffer  # the file: bytes, or the bytearray a streamed upload filled
    header: ImageHeader
    canvas: tiles_pb2.Canvas = field(default_factory=tiles_pb2.Canvas)
    failure: ChainError | None = None  # the file turned out unreadable while decoding
    # the stage takes no attachment in this role, so the image joins the stage's inputs as if
    # the previous stage had made it (a chain may start with any stage that transforms images)
    joins_inputs: bool = False

    @property
    def mask(self) -> bool:
        return self.role == "mask"

    async def tiles(self, edge: int) -> AsyncIterator[tiles_pb2.Tile]:
        """The canvas's transport tiles, decoded in a worker thread as they are sent, so the
        event loop never waits for a decode and at most a band's pixels exist at once. A file
        that turns out unreadable ends its tiles early: the stage then refuses its incomplete
        input, and rpc_error reports this failure as the cause. (Raising here would make gRPC
        cancel the call, and the job would read as cancelled.)"""
        iterator = image_tiles(self.data, self.header, self.mask, self.canvas.id, edge)
        while True:
            try:
                batch = await asyncio.to_thread(_next_batch, iterator)
            except ImageDecodeError as exc:
                self.failure = invalid(f"{self.label}: attached {self.role}: {exc}")
                return
            if not batch:
                return
            for tile in batch:
                yield tile


def _next_batch(tiles: Iterator[tiles_pb2.Tile]) -> list[tiles_pb2.Tile]:
    batch, size = [], 0
    for tile in tiles:
        batch.append(tile)
        size += len(tile.pixels)
        if size >= TILE_BATCH_BYTES:
            break
    return batch


@dataclass
class PlannedStage:
    index: int
    name: str
    type: str
    params: dict[str, Any]
    family: Family
    attachments: list[AttachedImage] = field(default_factory=list)
    inputs: list[tiles_pb2.Canvas] = field(default_factory=list)
    outputs: list[tiles_pb2.Canvas] = field(default_factory=list)
    emits_latent: str = ""      # from the stage's plan: see stage.proto PlanResult
    accepts_latent: str = ""
    latent_output: bool = False  # hand the next stage latents
    attempt: int = 1             # the job's run (a job is run again after its gateway or a service died)
    notices: list[str] = field(default_factory=list)  # what of its onnx-web params has no effect

    @property
    def label(self) -> str:
        return stage_label(self.name, self.type)

    def start(self, job_id: str, transport_tile: int) -> stage_pb2.StageStart:
        return stage_pb2.StageStart(
            job_id=job_id,
            name=self.name,
            type=self.type,
            params=dict_to_struct(self.params),
            inputs=self.inputs,
            transport_tile=transport_tile,
            latent_output=self.latent_output,
            attempt=self.attempt,
        )

    def release(self) -> None:
        """Drop the attached files' bytes (the job has ended)."""
        self.attachments.clear()


STAGE_KEYS = {"name", "type", "params"}
DOCUMENT_KEYS = {"stages", "defaults", "platform"}  # onnx-web's chain document (its chain.yaml)
MAX_NAME_CHARS = 128  # of a stage's name and type


def _json_int(text: str) -> int | float:
    # int() of more than 4300 digits raises ValueError; as a float it is inf, which
    # check_value then refuses by param name
    return int(text) if len(text) <= 4000 else float(text)


def load_chain_json(text: str) -> Any:
    """The chain's JSON, numbers and nesting left for check_value to judge by param name:
    NaN, Infinity and numbers too large for a double load as non-finite floats."""
    if len(text) > MAX_CHAIN_BYTES:
        raise invalid(f"chain_json: {len(text)} characters, over the limit of {MAX_CHAIN_BYTES}")
    try:
        return json.loads(text, parse_int=_json_int, parse_constant=float)
    except json.JSONDecodeError as exc:
        raise invalid(f"chain_json: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:  # json's C parser checks its depth: this is an error, not a crash
        raise invalid(too_deep_message(text)) from None


SCAN_TOKENS = 20_000  # a bound on the scan's cost (tens of milliseconds)
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}:,]')


def too_deep_message(text: str) -> str:
    """For chain JSON too deep to parse: the stage and param whose value nests too deep, found
    by a scan of its brackets, strings and keys (only this error path pays for it)."""
    frames: list[list] = []  # per open container: its bracket, and the current key (object) or index (list)
    stages: dict[int, dict[str, str]] = {}
    found: tuple[int, str] | None = None
    limit = 4 + MAX_PARAM_DEPTH  # document, stages list, stage, params, then the value's own levels
    for number, match in enumerate(_JSON_TOKENS.finditer(text)):
        if number == SCAN_TOKENS:
            break
        token = match.group()
        top = frames[-1] if frames else None
        if token in "[{":
            frames.append([token, 0 if token == "[" else None])
            if found is None and len(frames) > limit and frames[0][1] == "stages" and frames[2][1] == "params":
                found = (frames[1][1], frames[3][1])
        elif token in "]}":
            if frames:
                frames.pop()
        elif token == "," and top is not None:
            top[1] = top[1] + 1 if top[0] == "[" else None
        elif token.startswith('"') and top is not None and top[0] == "{":
            if top[1] is None:
                top[1] = json.loads(token)  # a key
            elif len(frames) == 3 and frames[0][1] == "stages" and top[1] in ("name", "type"):
                stages.setdefault(frames[1][1], {})[top[1]] = json.loads(token)
        if found is not None and {"name", "type"} <= stages.get(found[0], {}).keys():
            break
    deep = f"is nested more than {MAX_PARAM_DEPTH} lists or objects deep"
    if found is None:
        return f"chain_json: nested too deeply (params may nest lists and objects {MAX_PARAM_DEPTH} deep)"
    stage = stages.get(found[0], {})
    if {"name", "type"} <= stage.keys():
        return f"{stage_label(shown(stage['name']).strip(chr(39)), shown(stage['type']).strip(chr(39)))}: param {shown(found[1])}: {deep}"
    return f"chain_json: stages[{found[0]}].params.{shown(found[1]).strip(chr(39))} {deep}"


@dataclass
class ChainDocument:
    """A chain as the request gave it: the stages as plain dicts, and onnx-web's top-level
    defaults and platform."""

    stages: list[dict[str, Any]]
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    platform: str = ""


def parse_chain(request: gateway_pb2.ChainRequest) -> ChainDocument:
    """The chain from whichever form the request gave: chain, chain_json, or the request's own
    stages (onnx-web's document as the request, POST /v1/jobs)."""
    given = {"chain": bool(request.chain.stages), "chain_json": bool(request.chain_json), "stages": bool(request.stages)}
    forms = [name for name, present in given.items() if present]
    if len(forms) > 1:
        raise invalid(f"give one of chain, chain_json or stages, not {' and '.join(forms)}")
    if request.chain_json:
        document = parse_chain_json(request.chain_json)
    elif request.chain.stages:
        document = structured("chain", request.chain, request.chain.stages, request.chain.defaults, request.chain.platform)
    else:
        document = structured("request", request, request.stages, request.defaults, request.platform)
    if not document.stages:
        raise invalid("the chain has no stages")
    seen: set[str] = set()
    for number, stage in enumerate(document.stages):
        name, kind = stage.get("name"), stage.get("type")
        if not isinstance(name, str) or not name:
            raise invalid(f"stages[{number}]: every stage needs a name")
        if len(name) > MAX_NAME_CHARS or not name.isprintable():
            raise invalid(f"stages[{number}]: the name {shown(name)} is not printable text of at most {MAX_NAME_CHARS} characters")
        if not isinstance(kind, str) or not kind:
            raise invalid(f"stage '{name}': needs a type")
        if len(kind) > MAX_NAME_CHARS or not kind.isprintable():
            raise invalid(f"stage '{name}': the type {shown(kind)} is not a stage type")
        if name in seen:
            raise invalid(f"stage '{name}': the name is used twice; stage names must be unique")
        seen.add(name)
    return document


def parse_chain_json(text: str) -> ChainDocument:
    document = load_chain_json(text)
    if not isinstance(document, dict) or not isinstance(document.get("stages"), list):
        raise invalid('chain_json: expected an object with a "stages" list')
    extra = set(document) - DOCUMENT_KEYS
    if extra:
        raise invalid(f"chain_json: unknown key(s) {sorted(extra)} (a chain has stages, and onnx-web's defaults and platform)")
    stages = document["stages"]
    for number, stage in enumerate(stages):
        if not isinstance(stage, dict):
            raise invalid(f"chain_json: stages[{number}] is not an object")
        extra = set(stage) - STAGE_KEYS
        if extra:
            raise invalid(f"chain_json: stages[{number}]: unknown key(s) {sorted(extra)} (a stage has name, type, params)")
        if not isinstance(stage.get("params") or {}, dict):
            raise invalid(f"chain_json: stages[{number}]: params must be an object")
    platform = document.get("platform") or ""
    if not isinstance(platform, str):
        raise invalid(f"chain_json: platform: expected a string, got {shown(platform)}")
    return ChainDocument(stages, checked_defaults(document.get("defaults")), platform)


def structured(where: str, message: Any, stages: Any, defaults: Any, platform: str) -> ChainDocument:
    """The chain from protobuf messages (a Chain, or the request's own stages)."""
    size = sum(s.ByteSize() for s in stages) + defaults.ByteSize()
    if size > MAX_CHAIN_BYTES:
        raise invalid(f"{where}: {size} bytes of stages, over the limit of {MAX_CHAIN_BYTES}")
    rows = [{"name": s.name, "type": s.type, "params": struct_to_dict(s.params)} for s in stages]
    return ChainDocument(rows, checked_defaults(struct_to_dict(defaults)), platform)


def checked_defaults(defaults: Any) -> dict[str, dict[str, Any]]:
    try:
        return dialect.check_defaults(defaults)
    except ParamError as exc:
        raise invalid(f"{exc.param}: {exc.message}") from None


async def fetch_catalogs(families: dict[str, Family], needed: set[str]) -> dict[str, stage_pb2.StageSpec]:
    """The specs of every stage type the needed families serve."""
    try:
        catalogs = await asyncio.gather(*(families[f].describe() for f in sorted(needed)))
    except FamilyUnavailable as exc:
        raise ChainError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
    return {spec.type: spec for catalog in catalogs for spec in catalog.stages}


def check_attachments(
    request: gateway_pb2.ChainRequest,
    stages: dict[str, PlannedStage],
    specs: dict[str, stage_pb2.StageSpec],
    settings: Settings,
    attachment_data: list[Buffer] | None = None,
) -> None:
    """Check each attached file by its header against the limits; decode nothing.
    attachment_data: the files' bytes when they did not come in the request (SubmitChainStream)."""
    for number, attachment in enumerate(request.attachments):
        stage, role, joins = attachment_target(number, attachment.stage, attachment.role, stages, specs)
        if any(a.role == role for a in stage.attachments):
            raise invalid(f"{stage.label}: more than one {role} attached")
        data = attachment.data if attachment_data is None else attachment_data[number]
        header = checked_header(stage, role, data, len(data), settings)
        log.info("%s: attached %s: %s, %d bytes", stage.label, role, header.describe(), len(data))
        stage.attachments.append(AttachedImage(stage.label, role, data, header, joins_inputs=joins))


def chain_families(document: ChainDocument) -> set[str]:
    """The families a parsed chain needs; INVALID_ARGUMENT for a type no family serves."""
    needed = set()
    for stage in document.stages:
        family = family_of(stage["type"])
        if family is None:
            raise invalid(f"{stage_label(stage['name'], stage['type'])}: unknown stage type{onnx_web_only(stage['type'])}")
        needed.add(family)
    return needed


ATTACHMENT_PREFIXES = {"source": "image", "mask": "mask"}  # onnx-web's source:<stage>, mask:<stage>
JOINING_ROLES = ("image", "mask")  # roles an attachment may join a stage's inputs in


def attachment_target(
    number: int, stage_name: str, role: str, stages: dict[str, PlannedStage], specs: dict[str, stage_pb2.StageSpec]
) -> tuple[PlannedStage, str, bool]:
    """The stage an attachment names (by name, or by onnx-web's `source:<stage>` and
    `mask:<stage>`), its role, and whether it joins the stage's inputs: an image or mask
    attached to a stage that takes no attachment in that role arrives as if the previous stage
    had made it, so a chain may start with any stage that transforms images. Or the refusal."""
    prefix, sep, rest = stage_name.partition(":")
    if sep and prefix in ATTACHMENT_PREFIXES and rest and stage_name not in stages:
        implied = ATTACHMENT_PREFIXES[prefix]
        if role and role != implied:
            raise invalid(f"attachments[{number}]: {shown(stage_name)} names a{'n' if implied == 'image' else ''} {implied}, but role is {shown(role)}")
        stage_name, role = rest, implied
    stage = stages.get(stage_name)
    if stage is None:
        raise invalid(f"attachments[{number}]: there is no stage named {shown(stage_name)}")
    role = role or "image"
    if role not in ROLE_NAMES:
        raise invalid(f"{stage.label}: attachment role {shown(role)} is not one of {', '.join(map(repr, ROLE_NAMES))}")
    joins = role not in specs[stage.type].attachments
    if joins and role not in JOINING_ROLES:
        raise invalid(f"{stage.label}: takes no attached {role}")
    return stage, role, joins


def checked_header(
    stage: PlannedStage, role: str, data: Buffer, size: int, settings: Settings, partial: bool = False
) -> ImageHeader | None:
    """The file's header, checked against the limits. size: the whole file's bytes, which a
    streamed upload knows before they have all arrived; partial: data is only the file's start,
    so an unreadable header may just be longer (None: check again later)."""
    try:
        header = read_header(data)
    except ImageDecodeError as exc:
        if partial:
            return None
        raise invalid(f"{stage.label}: attached {role}: {exc}") from None
    problem = limits_message(header, size, role == "mask", settings.max_pixels, settings.max_decode_ratio)
    if problem:
        raise invalid(f"{stage.label}: attached {role} {problem}")
    return header


async def check_stages(
    request: gateway_pb2.ChainRequest, families: dict[str, Family], attempt: int = 1
) -> tuple[list[PlannedStage], dict[str, stage_pb2.StageSpec]]:
    """The first checks, which need no attachment: the chain's form, its stage types and params
    against the catalogs, the transport tile. SubmitChainStream runs them before the upload."""
    document = parse_chain(request)
    problem = transport_tile_problem(request.transport_tile)
    if problem:
        raise invalid(f"transport_tile: {problem}")
    specs = await fetch_catalogs(families, chain_families(document))

    planned: list[PlannedStage] = []
    defaults = dialect.DefaultsUse(document.defaults)
    for number, stage in enumerate(document.stages):
        spec = specs.get(stage["type"])
        label = stage_label(stage["name"], stage["type"])
        if spec is None:
            served = ", ".join(sorted(t for t in specs if family_of(t) == family_of(stage["type"]))) or "none"
            raise invalid(f"{label}: unknown stage type{onnx_web_only(stage['type'])} (the {family_of(stage['type'])} service serves: {served})")
        if spec.unavailable:
            raise ChainError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{label}: the {spec.family} service cannot run this stage: {spec.unavailable}",
            )
        try:
            # onnx-web's dialect (docs/onnx-web.md), then the stage's own schema
            params, notices = dialect.translate(stage["type"], stage.get("params") or {}, spec)
            defaults.record(dialect.apply_defaults(stage["type"], params, document.defaults, spec))
            validate_params([Param.from_proto(p) for p in spec.params], params)
        except ParamError as exc:
            raise invalid(param_message(stage["name"], stage["type"], exc)) from None
        texts = [dialect.notice_text(name, why) for name, why in notices]
        planned.append(PlannedStage(number, stage["name"], stage["type"], params, families[spec.family], attempt=attempt, notices=texts))
    # notices about the chain as a whole go with its first stage
    chain_notices = [dialect.platform_notice(document.platform)] if document.platform else []
    planned[0].notices[:0] = chain_notices + defaults.notices()
    return planned, specs


async def plan_chain(
    request: gateway_pb2.ChainRequest,
    families: dict[str, Family],
    settings: Settings,
    job_id: str,
    attempt: int = 1,
    attachment_data: list[Buffer] | None = None,
) -> list[PlannedStage]:
    planned, specs = await check_stages(request, families, attempt)
    by_name = {s.name: s for s in planned}
    check_attachments(request, by_name, specs, settings, attachment_data)
    for stage in planned:
        for role in specs[stage.type].required_attachments:
            if not any(a.role == role for a in stage.attachments):
                raise invalid(f"{stage.label}: needs an attached {role} (attach one to stage '{stage.name}')")

    previous: list[tiles_pb2.Canvas] = []
    for stage in planned:
        await plan_stage(stage, previous, job_id, request.transport_tile)
        previous = stage.outputs
    if not request.decode_between_stages and request.return_tiles != gateway_pb2.TILE_RETURN_ALL:
        await plan_latent_handoffs(planned, job_id, request.transport_tile)
    check_job_pixels(planned, specs, settings)
    return planned


SIZE_PARAMS = ("count", "scale", "outscale", "upscale", "width", "height", "border")


def check_job_pixels(planned: list[PlannedStage], specs: dict[str, stage_pb2.StageSpec], settings: Settings) -> None:
    """The job's output pixels, every planned canvas of every stage together, within
    TILECHAIN_MAX_JOB_PIXELS: the work a request may ask for, however it spreads it over
    `count` and stages. Named by the stage that crosses the limit, and its param that most
    likely sets how much it makes."""
    total = 0
    for stage in planned:
        made = sum(w * h for w, h in (image_size(c) for c in stage.outputs))
        total += made
        if total > settings.max_job_pixels:
            names = [p.name for p in specs[stage.type].params]
            param = next((n for n in SIZE_PARAMS if n in names), "size")
            raise invalid(
                f"{stage.label}: param '{param}': the job would make {total} output pixels by this stage "
                f"({made} in {len(stage.outputs)} image(s) here), over the limit of {settings.max_job_pixels} "
                "(TILECHAIN_MAX_JOB_PIXELS)"
            )


def onnx_web_only(stage_type: str) -> str:
    if stage_type in dialect.ONNX_WEB_ONLY_STAGES:
        return ": onnx-web has it, tilechain does not (yet); docs/onnx-web.md lists the stages"
    return ""


async def plan_stage(stage: PlannedStage, previous: list[tiles_pb2.Canvas], job_id: str, transport_tile: int) -> None:
    """Ask the stage's service to plan it on the previous stage's outputs plus its attachments
    (with the job's transport tile: the outputs' grids depend on it)."""
    stage.inputs = list(previous)
    for attached in stage.attachments:
        role = ROLE_NAMES[attached.role]
        attached.canvas = tiles_pb2.Canvas(
            id=len(stage.inputs),
            width=attached.header.width,
            height=attached.header.height,
            format=FORMAT_FOR_CHANNELS[attached.header.channels(attached.mask)],
            role=role,
            # an image joining the inputs comes after the previous stage's images of its role
            index=sum(1 for c in stage.inputs if c.role == role) if attached.joins_inputs else 0,
            attached=not attached.joins_inputs,
        )
        stage.inputs.append(attached.canvas)
    try:
        result = await stage.family.plan(stage.start(job_id, transport_tile), timeout=plan_timeout())
    except grpc.aio.AioRpcError as exc:
        raise rpc_error(stage, exc) from None
    stage.outputs = list(result.outputs)
    stage.emits_latent, stage.accepts_latent = result.emits_latent, result.accepts_latent


async def plan_latent_handoffs(planned: list[PlannedStage], job_id: str, transport_tile: int) -> None:
    """Where a stage can emit latents in the space the next stage accepts (two diffusion stages
    on one VAE), re-plan the pair to hand over latents: the first skips its VAE decode and the
    second its encode. The caller sees pixels only from the last stage, which never hands over."""
    for before, after in zip(planned, planned[1:]):
        if not before.emits_latent or before.emits_latent != after.accepts_latent:
            continue
        if any(a.joins_inputs for a in after.attachments):
            continue  # an attached image joins its inputs as pixels: no mixing with latents
        before.latent_output = True
        await plan_stage(before, planned[before.index - 1].outputs if before.index else [], job_id, transport_tile)
        await plan_stage(after, before.outputs, job_id, transport_tile)
        log.info("job %s: %s hands latents (%s) to %s", job_id, before.label, before.emits_latent, after.label)


def connection_broke(exc: grpc.aio.AioRpcError) -> bool:
    """gRPC's asyncio client reports a stream whose connection broke while it was sending as
    INTERNAL "Internal error from Core" (the failed send hides the UNAVAILABLE underneath): the
    service died or went away mid-stream, which is not an error of the service's own."""
    return exc.code() == grpc.StatusCode.INTERNAL and "execute_batch" in (exc.debug_error_string() or "")


def rpc_error(stage: PlannedStage, exc: grpc.aio.AioRpcError) -> ChainError:
    """A service's error as the gateway reports it: the service's own message where it gave one
    (it names the stage and param), else which service could not be reached. An attachment
    that failed to decode while streaming is the cause of its stage's call ending."""
    failure = next((a.failure for a in stage.attachments if a.failure is not None), None)
    if failure is not None:
        return failure
    code = exc.code()
    details = public_text(exc.details() or "")
    if connection_broke(exc):
        code, details = grpc.StatusCode.UNAVAILABLE, "the connection broke mid-stream"
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        what = "unavailable" if code == grpc.StatusCode.UNAVAILABLE else code.name.lower().replace("_", " ")
        return ChainError(code, f"{stage.label}: the {stage.family.name} service at {stage.family.address} is {what}: {details}")
    if code == grpc.StatusCode.UNKNOWN:  # a service that let an exception escape: never UNKNOWN to the client
        return ChainError(grpc.StatusCode.INTERNAL, f"{stage.label}: internal error in the {stage.family.name} service; see its log")
    return ChainError(code, details or f"{stage.label}: {code.name}")


# The families whose stages stage files until the job ends (the Stage.Finish RPC).
STAGING_FAMILIES = ("persist",)


async def finish_job(stages: list[PlannedStage], job_id: str, attempt: int, commit: bool) -> list[stage_pb2.Artifact]:
    """Publish (commit) or discard a job's staged files on every service that staged some, and
    drop the job's attachments either way. The published artifacts, on commit."""
    for stage in stages:
        stage.release()
    families = {s.family.name: s for s in stages if s.family.name in STAGING_FAMILIES}
    request = stage_pb2.FinishRequest(job_id=job_id, attempt=attempt, commit=commit)
    artifacts: list[stage_pb2.Artifact] = []
    for stage in families.values():
        try:
            artifacts += await stage.family.finish(request)
        except grpc.aio.AioRpcError as exc:
            raise rpc_error(stage, exc) from None
    return artifacts
