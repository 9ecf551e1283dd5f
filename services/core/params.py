"""Params schemas: declared by stage classes, published in catalogs, and checked by the same
code in the gateway (against catalogs) and in the services (against the classes)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from google.protobuf import json_format, struct_pb2

from tilechain.v1 import stage_pb2


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

_TYPES: dict[type, int] = {
    int: stage_pb2.PARAM_TYPE_INT,
    float: stage_pb2.PARAM_TYPE_FLOAT,
    bool: stage_pb2.PARAM_TYPE_BOOL,
    str: stage_pb2.PARAM_TYPE_STRING,
    list: stage_pb2.PARAM_TYPE_LIST,
    dict: stage_pb2.PARAM_TYPE_OBJECT,
}
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list", dict: "an object"}


# What a param value may be, checked before its type and range (docs/design.md, "Limits"):
# lists and objects nested at most this deep, numbers finite, whole numbers within what a
# JSON number (a double, as google.protobuf.Struct stores it) holds exactly.
MAX_PARAM_DEPTH = 8
MAX_EXACT_INT = 2**53
SHOWN_CHARS = 60  # of a bad value, in an error message


class ParamError(ValueError):
    """A param that is unknown, missing, of the wrong type or out of range."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


@dataclass(frozen=True)
class Param:
    name: str
    type: type
    default: Any = REQUIRED
    doc: str = ""
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] = field(default=())
    keywords: tuple[str, ...] = field(default=())  # strings accepted besides the type ("auto")

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def type_fits(self, value: Any) -> bool:
        """Whether the value is of this param's type (or one of its keywords), range aside."""
        if isinstance(value, str) and value in self.keywords:
            return True
        if self.type is bool:
            return isinstance(value, bool)
        if self.type is int:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()
        if self.type is float:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return isinstance(value, self.type)

    def check(self, value: Any) -> Any:
        """The value converted to this param's type, or ParamError."""
        if isinstance(value, str) and value in self.keywords:
            return value
        check_value(self.name, value)
        ok = self.type_fits(value)
        if ok and self.type in (int, float):
            value = self.type(value)
        if not ok:
            also = "".join(f" or {k!r}" for k in self.keywords)
            raise ParamError(self.name, f"expected {_TYPE_NAMES[self.type]}{also}, got {shown(value)}")
        if self.choices and value not in self.choices:
            raise ParamError(self.name, f"{shown(value)} is not one of {', '.join(map(repr, self.choices))}")
        if self.min is not None and value < self.min:
            raise ParamError(self.name, f"{value!r} is below the minimum {number_text(self.min)}")
        if self.max is not None and value > self.max:
            raise ParamError(self.name, f"{value!r} is above the maximum {number_text(self.max)}")
        return value

    def to_proto(self) -> stage_pb2.ParamSpec:
        spec = stage_pb2.ParamSpec(
            name=self.name, type=_TYPES[self.type], required=self.required, doc=self.doc, keywords=self.keywords
        )
        spec.default.CopyFrom(to_value(None if self.required else self.default))
        if self.min is not None:
            spec.minimum = self.min
        if self.max is not None:
            spec.maximum = self.max
        for choice in self.choices:
            spec.choices.add().CopyFrom(to_value(choice))
        return spec

    @classmethod
    def from_proto(cls, spec: stage_pb2.ParamSpec) -> Param:
        kind = {v: k for k, v in _TYPES.items()}[spec.type]
        def typed(v: Any) -> Any:
            return kind(v) if kind in (int, float) and v is not None else v

        return cls(
            name=spec.name,
            type=kind,
            default=REQUIRED if spec.required else _default(typed, from_value(spec.default), spec.keywords),
            doc=spec.doc,
            min=spec.minimum if spec.HasField("minimum") else None,
            max=spec.maximum if spec.HasField("maximum") else None,
            choices=tuple(typed(from_value(c)) for c in spec.choices),
            keywords=tuple(spec.keywords),
        )


def _default(typed: Any, value: Any, keywords: Any) -> Any:
    return value if isinstance(value, str) and value in keywords else typed(value)


def number_text(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def shown(value: Any) -> str:
    """A value as an error message quotes it: its repr, cut short (a param can hold a
    megabyte of text or a 400-digit number; the message must not)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 3 * SHOWN_CHARS:
        # str() of a huge int is slow, and refused past 4300 digits: count them instead
        return f"a {int(value.bit_length() * math.log10(2)) + 1}-digit number"
    text = repr(value) if not isinstance(value, (list, dict)) else type(value).__name__
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…"


def check_value(param: str, value: Any, depth: int = 0) -> None:
    """ParamError unless value is plain JSON data that fits: null, true/false, finite
    numbers (whole numbers within ±2^53), strings, and lists/objects nested at most
    MAX_PARAM_DEPTH deep. Called on every param before its type and range are checked, by the
    gateway and by the services, so an overflowing or deeply nested value is refused by name
    instead of failing somewhere inside."""
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        if abs(value) > MAX_EXACT_INT:
            raise ParamError(param, f"{shown(value)} does not fit: whole numbers must lie within ±2^53 ({MAX_EXACT_INT})")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ParamError(param, f"{value!r} is not a finite number (a number too large for a double reads as inf)")
        if value.is_integer() and abs(value) > MAX_EXACT_INT:
            raise ParamError(param, f"{value:.6g} does not fit: whole numbers must lie within ±2^53 ({MAX_EXACT_INT})")
        return
    if isinstance(value, (list, dict)):
        if depth >= MAX_PARAM_DEPTH:
            raise ParamError(param, f"is nested more than {MAX_PARAM_DEPTH} lists or objects deep")
        for item in value.values() if isinstance(value, dict) else value:
            check_value(param, item, depth + 1)
        return
    raise ParamError(param, f"{type(value).__name__} is not a JSON value")


def validate_params(specs: Sequence[Param], raw: Mapping[str, Any]) -> dict[str, Any]:
    """Check raw params against specs: unknown names, missing required ones, types, ranges.
    Returns every param, defaults filled in."""
    known = {p.name: p for p in specs}
    for name in raw:
        if name not in known:
            names = ", ".join(sorted(known)) or "none"
            raise ParamError(shown(name).strip("'\""), f"unknown param (this stage takes: {names})")
    values: dict[str, Any] = {}
    for spec in specs:
        if spec.name in raw and raw[spec.name] is not None:
            values[spec.name] = spec.check(raw[spec.name])
        elif spec.required:
            raise ParamError(spec.name, "is required")
        else:
            values[spec.name] = spec.default
    return values


def to_value(x: Any) -> struct_pb2.Value:
    value = struct_pb2.Value()
    json_format.ParseDict(x, value)
    return value


def from_value(value: struct_pb2.Value) -> Any:
    return json_format.MessageToDict(value)


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain data. Unlike json_format.MessageToDict this keeps inf and NaN (for
    check_value to refuse by name, not a ValueError from deep inside), and it stops
    descending at MAX_STRUCT_DEPTH: deeper content becomes a list nested just as deep, which
    check_value refuses, so a hostile message never makes it recurse far."""
    return {key: _from_value(value, 1) for key, value in struct.fields.items()}


MAX_STRUCT_DEPTH = 32  # params (at most MAX_PARAM_DEPTH) inside a provenance fit with room


def _from_value(value: struct_pb2.Value, depth: int) -> Any:
    kind = value.WhichOneof("kind")
    if kind in ("struct_value", "list_value") and depth >= MAX_STRUCT_DEPTH:
        nested: list = []
        for _ in range(MAX_PARAM_DEPTH + 1):
            nested = [nested]
        return nested
    if kind == "struct_value":
        return {key: _from_value(item, depth + 1) for key, item in value.struct_value.fields.items()}
    if kind == "list_value":
        return [_from_value(item, depth + 1) for item in value.list_value.values]
    if kind == "number_value":
        return value.number_value
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    return None


def dict_to_struct(data: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(dict(data))
    return struct
