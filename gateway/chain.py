"""Turning a ChainRequest into a checked plan before anything runs: parse the chain, check every
stage's type and params against its service's catalog, decode the attachments, then ask each
service to plan its stage so that sizes and masks are checked too."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from tilechain.services.core.codecs import FORMAT_FOR_CHANNELS, ImageDecodeError, decode_image, encoded_size
from tilechain.services.core.config import Settings
from tilechain.services.core.params import Param, ParamError, dict_to_struct, struct_to_dict, validate_params
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


@dataclass
class AttachedImage:
    role: str
    pixels: np.ndarray
    canvas: tiles_pb2.Canvas = field(default_factory=tiles_pb2.Canvas)
    # the stage takes no attachment in this role, so the image joins the stage's inputs as if
    # the previous stage had made it (a chain may start with any stage that transforms images)
    joins_inputs: bool = False


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
        )


STAGE_KEYS = {"name", "type", "params"}
DOCUMENT_KEYS = {"stages", "defaults", "platform"}  # onnx-web's chain document (its chain.yaml)


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
        document = structured(request.chain.stages, request.chain.defaults, request.chain.platform)
    else:
        document = structured(request.stages, request.defaults, request.platform)
    if not document.stages:
        raise invalid("the chain has no stages")
    seen: set[str] = set()
    for number, stage in enumerate(document.stages):
        name, kind = stage.get("name"), stage.get("type")
        if not isinstance(name, str) or not name:
            raise invalid(f"stages[{number}]: every stage needs a name")
        if not isinstance(kind, str) or not kind:
            raise invalid(f"stage '{name}': needs a type")
        if name in seen:
            raise invalid(f"stage '{name}': the name is used twice; stage names must be unique")
        seen.add(name)
    return document


def parse_chain_json(text: str) -> ChainDocument:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise invalid(f"chain_json: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
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
        raise invalid(f"chain_json: platform: expected a string, got {platform!r}")
    return ChainDocument(stages, checked_defaults(document.get("defaults")), platform)


def structured(stages: Any, defaults: Any, platform: str) -> ChainDocument:
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


ATTACHMENT_PREFIXES = {"source": "image", "mask": "mask"}  # onnx-web's source:<stage>, mask:<stage>


def attachment_target(number: int, attachment: gateway_pb2.Attachment) -> tuple[str, str]:
    """The stage name and role of an attachment: by name and role, or by onnx-web's
    `source:<stage>` / `mask:<stage>` names."""
    name, role = attachment.stage, attachment.role
    prefix, sep, rest = name.partition(":")
    if sep and prefix in ATTACHMENT_PREFIXES and rest:
        implied = ATTACHMENT_PREFIXES[prefix]
        if role and role != implied:
            raise invalid(f"attachments[{number}]: {name!r} names a{'n' if implied == 'image' else ''} {implied}, but role is {role!r}")
        return rest, implied
    return name, role or "image"


def decode_attachments(
    request: gateway_pb2.ChainRequest, stages: dict[str, PlannedStage], specs: dict[str, stage_pb2.StageSpec], settings: Settings
) -> None:
    for number, attachment in enumerate(request.attachments):
        name, role = attachment_target(number, attachment)
        stage = stages.get(name)
        if stage is None:
            raise invalid(f"attachments[{number}]: there is no stage named '{name}'")
        if role not in ROLE_NAMES:
            raise invalid(f"{stage.label}: attachment role {role!r} is not 'image' or 'mask'")
        if any(a.role == role for a in stage.attachments):
            raise invalid(f"{stage.label}: more than one {role} attached")
        try:
            width, height = encoded_size(attachment.data)
            if width * height > settings.max_pixels:
                raise invalid(
                    f"{stage.label}: attached {role} is {width}x{height}, over the limit of "
                    f"{settings.max_pixels} pixels (TILECHAIN_MAX_PIXELS)"
                )
            pixels = decode_image(attachment.data, mask=role == "mask")
        except ImageDecodeError as exc:
            raise invalid(f"{stage.label}: attached {role}: {exc}") from None
        joins = role not in specs[stage.type].attachments
        stage.attachments.append(AttachedImage(role, pixels, joins_inputs=joins))


async def plan_chain(
    request: gateway_pb2.ChainRequest, families: dict[str, Family], settings: Settings, job_id: str
) -> list[PlannedStage]:
    document = parse_chain(request)
    needed = set()
    for stage in document.stages:
        family = family_of(stage["type"])
        if family is None:
            raise invalid(f"{stage_label(stage['name'], stage['type'])}: unknown stage type{onnx_web_only(stage['type'])}")
        needed.add(family)
    specs = await fetch_catalogs(families, needed)

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
        planned.append(PlannedStage(number, stage["name"], stage["type"], params, families[spec.family], notices=texts))
    # notices about the chain as a whole go with its first stage
    chain_notices = [dialect.platform_notice(document.platform)] if document.platform else []
    planned[0].notices[:0] = chain_notices + defaults.notices()

    by_name = {s.name: s for s in planned}
    decode_attachments(request, by_name, specs, settings)
    for stage in planned:
        for role in specs[stage.type].required_attachments:
            if not any(a.role == role for a in stage.attachments):
                raise invalid(f"{stage.label}: needs an attached {role} (attach one to stage '{stage.name}')")

    previous: list[tiles_pb2.Canvas] = []
    for stage in planned:
        await plan_stage(stage, previous, job_id)
        previous = stage.outputs
    if not request.decode_between_stages and request.return_tiles != gateway_pb2.TILE_RETURN_ALL:
        await plan_latent_handoffs(planned, job_id)
    return planned


def onnx_web_only(stage_type: str) -> str:
    if stage_type in dialect.ONNX_WEB_ONLY_STAGES:
        return ": onnx-web has it, tilechain does not (yet); docs/onnx-web.md lists the stages"
    return ""


async def plan_stage(stage: PlannedStage, previous: list[tiles_pb2.Canvas], job_id: str) -> None:
    """Ask the stage's service to plan it on the previous stage's outputs plus its attachments."""
    stage.inputs = list(previous)
    for attached in stage.attachments:
        height, width, chans = attached.pixels.shape
        role = ROLE_NAMES[attached.role]
        attached.canvas = tiles_pb2.Canvas(
            id=len(stage.inputs),
            width=width,
            height=height,
            format=FORMAT_FOR_CHANNELS[chans],
            role=role,
            # an image joining the inputs comes after the previous stage's images of its role
            index=sum(1 for c in stage.inputs if c.role == role) if attached.joins_inputs else 0,
            attached=not attached.joins_inputs,
        )
        stage.inputs.append(attached.canvas)
    try:
        result = await stage.family.stub.Plan(stage.start(job_id, 0), timeout=10.0)
    except grpc.aio.AioRpcError as exc:
        raise rpc_error(stage, exc) from None
    stage.outputs = list(result.outputs)
    stage.emits_latent, stage.accepts_latent = result.emits_latent, result.accepts_latent


async def plan_latent_handoffs(planned: list[PlannedStage], job_id: str) -> None:
    """Where a stage can emit latents in the space the next stage accepts (two diffusion stages
    on one VAE), re-plan the pair to hand over latents: the first skips its VAE decode and the
    second its encode. The caller sees pixels only from the last stage, which never hands over."""
    for before, after in zip(planned, planned[1:]):
        if not before.emits_latent or before.emits_latent != after.accepts_latent:
            continue
        if any(a.joins_inputs for a in after.attachments):
            continue  # an attached image joins its inputs as pixels: no mixing with latents
        before.latent_output = True
        await plan_stage(before, planned[before.index - 1].outputs if before.index else [], job_id)
        await plan_stage(after, before.outputs, job_id)
        log.info("job %s: %s hands latents (%s) to %s", job_id, before.label, before.emits_latent, after.label)


def rpc_error(stage: PlannedStage, exc: grpc.aio.AioRpcError) -> ChainError:
    """A service's error as the gateway reports it: the service's own message where it gave one
    (it names the stage and param), else which service could not be reached."""
    code = exc.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        what = "unavailable" if code == grpc.StatusCode.UNAVAILABLE else code.name.lower().replace("_", " ")
        return ChainError(code, f"{stage.label}: the {stage.family.name} service at {stage.family.address} is {what}: {exc.details()}")
    return ChainError(code, exc.details() or f"{stage.label}: {code.name}")
