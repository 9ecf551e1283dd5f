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
from tilechain.services.core.config import Settings, plan_timeout
from tilechain.services.core.params import Param, ParamError, dict_to_struct, struct_to_dict, validate_params
from tilechain.services.core.servicer import param_message
from tilechain.services.core.stage import ROLE_NAMES, stage_label
from tilechain.v1 import gateway_pb2, stage_pb2, tiles_pb2

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


def parse_chain(request: gateway_pb2.ChainRequest) -> list[dict[str, Any]]:
    """The chain's stages as plain dicts, from either form of the request."""
    if request.chain_json and request.chain.stages:
        raise invalid("give either chain or chain_json, not both")
    if request.chain_json:
        try:
            document = json.loads(request.chain_json)
        except json.JSONDecodeError as exc:
            raise invalid(f"chain_json: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
        if not isinstance(document, dict) or not isinstance(document.get("stages"), list):
            raise invalid('chain_json: expected an object with a "stages" list')
        stages = document["stages"]
        for number, stage in enumerate(stages):
            if not isinstance(stage, dict):
                raise invalid(f"chain_json: stages[{number}] is not an object")
            extra = set(stage) - STAGE_KEYS
            if extra:
                raise invalid(f"chain_json: stages[{number}]: unknown key(s) {sorted(extra)} (a stage has name, type, params)")
            if not isinstance(stage.get("params", {}), dict):
                raise invalid(f"chain_json: stages[{number}]: params must be an object")
    else:
        stages = [{"name": s.name, "type": s.type, "params": struct_to_dict(s.params)} for s in request.chain.stages]
    if not stages:
        raise invalid("the chain has no stages")
    seen: set[str] = set()
    for number, stage in enumerate(stages):
        name, kind = stage.get("name"), stage.get("type")
        if not isinstance(name, str) or not name:
            raise invalid(f"stages[{number}]: every stage needs a name")
        if not isinstance(kind, str) or not kind:
            raise invalid(f"stage '{name}': needs a type")
        if name in seen:
            raise invalid(f"stage '{name}': the name is used twice; stage names must be unique")
        seen.add(name)
    return stages


async def fetch_catalogs(families: dict[str, Family], needed: set[str]) -> dict[str, stage_pb2.StageSpec]:
    """The specs of every stage type the needed families serve."""
    try:
        catalogs = await asyncio.gather(*(families[f].describe() for f in sorted(needed)))
    except FamilyUnavailable as exc:
        raise ChainError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
    return {spec.type: spec for catalog in catalogs for spec in catalog.stages}


def decode_attachments(
    request: gateway_pb2.ChainRequest, stages: dict[str, PlannedStage], specs: dict[str, stage_pb2.StageSpec], settings: Settings
) -> None:
    for number, attachment in enumerate(request.attachments):
        stage = stages.get(attachment.stage)
        if stage is None:
            raise invalid(f"attachments[{number}]: there is no stage named '{attachment.stage}'")
        role = attachment.role or "image"
        if role not in ROLE_NAMES:
            raise invalid(f"{stage.label}: attachment role {role!r} is not 'image' or 'mask'")
        if role not in specs[stage.type].attachments:
            raise invalid(f"{stage.label}: takes no attached {role}")
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
        stage.attachments.append(AttachedImage(role, pixels))


async def plan_chain(
    request: gateway_pb2.ChainRequest, families: dict[str, Family], settings: Settings, job_id: str
) -> list[PlannedStage]:
    raw = parse_chain(request)
    needed = set()
    for stage in raw:
        family = family_of(stage["type"])
        if family is None:
            raise invalid(f"{stage_label(stage['name'], stage['type'])}: unknown stage type")
        needed.add(family)
    specs = await fetch_catalogs(families, needed)

    planned: list[PlannedStage] = []
    for number, stage in enumerate(raw):
        spec = specs.get(stage["type"])
        label = stage_label(stage["name"], stage["type"])
        if spec is None:
            served = ", ".join(sorted(t for t in specs if family_of(t) == family_of(stage["type"]))) or "none"
            raise invalid(f"{label}: unknown stage type (the {family_of(stage['type'])} service serves: {served})")
        if spec.unavailable:
            raise ChainError(
                grpc.StatusCode.UNIMPLEMENTED,
                f"{label}: the {spec.family} service cannot run this stage: {spec.unavailable}",
            )
        params = stage.get("params") or {}
        try:
            validate_params([Param.from_proto(p) for p in spec.params], params)
        except ParamError as exc:
            raise invalid(param_message(stage["name"], stage["type"], exc)) from None
        planned.append(PlannedStage(number, stage["name"], stage["type"], params, families[spec.family]))

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


async def plan_stage(stage: PlannedStage, previous: list[tiles_pb2.Canvas], job_id: str) -> None:
    """Ask the stage's service to plan it on the previous stage's outputs plus its attachments."""
    stage.inputs = list(previous)
    for attached in stage.attachments:
        height, width, chans = attached.pixels.shape
        attached.canvas = tiles_pb2.Canvas(
            id=len(stage.inputs),
            width=width,
            height=height,
            format=FORMAT_FOR_CHANNELS[chans],
            role=ROLE_NAMES[attached.role],
            attached=True,
        )
        stage.inputs.append(attached.canvas)
    try:
        result = await stage.family.stub.Plan(stage.start(job_id, 0), timeout=plan_timeout())
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
