"""Hostile requests: every one is refused early with INVALID_ARGUMENT and a message naming the
stage and the param, before anything runs, without costing the gateway memory (its RSS and
peak RSS stay flat over 16 of each), and the stack serves normally after each. No reply is
ever UNKNOWN, nor carries a server path or a Python object repr."""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path
from typing import Iterator

import grpc
import pytest

from tilechain.client import chain_request, connect
from tilechain.services.core.params import dict_to_struct
from tilechain.stack import Stack, process_memory
from tilechain.v1 import gateway_pb2

from .conftest import free_port, run_events
from .test_images import bomb_png

NOISE = {"name": "noise", "type": "source-noise", "params": {"width": 32, "height": 32, "seed": 1}}


def save(filename: str, **params) -> dict:
    return {"stages": [NOISE, {"name": "save", "type": "persist-disk", "params": {"filename": filename, **params}}]}


def up_json(scale_text: str) -> str:
    """A chain whose upscale param is given as raw JSON text (numbers Python would not write)."""
    return '{"stages": [%s, {"name": "up", "type": "upscale-simple", "params": {"scale": %s}}]}' % (json.dumps(NOISE), scale_text)


def nested(depth: int) -> list:
    value: list = [1]
    for _ in range(depth - 1):
        value = [value]
    return value


def faces_chain(depth: int) -> str:
    faces = "[" * depth + "1" + "]" * depth
    return ('{"stages": [%s, {"name": "fix", "type": "correct-gfpgan", "params": {"faces": %s}}]}'
            % (json.dumps(NOISE), faces))


def struct_chain(params: dict) -> gateway_pb2.ChainRequest:
    """The proto form of a chain (Struct params), as a gRPC client in another language sends it."""
    request = gateway_pb2.ChainRequest()
    request.chain.stages.add(name="noise", type="source-noise", params=dict_to_struct(NOISE["params"]))
    request.chain.stages.add(name="up", type="upscale-simple", params=dict_to_struct(params))
    return request


def deep_struct_chain(depth: int) -> gateway_pb2.ChainRequest:
    """A Struct nested deeper than protobuf parses (built from bytes: Python will not build it)."""
    request = struct_chain({"scale": 2})
    value = b"\x08\x00"  # Value{null_value}
    for _ in range(depth):
        lst = b"\x0a" + _varint(len(value)) + value        # ListValue{values: [value]}
        value = b"\x32" + _varint(len(lst)) + lst           # Value{list_value}
    data = request.SerializeToString()
    entry = b"\x0a\x05scale" + b"\x12" + _varint(len(value)) + value  # Struct.fields map entry
    extra = b"\x0a" + _varint(len(entry)) + entry                      # Struct{fields}
    stage = b"\x0a\x01x\x12\x0eupscale-simple\x1a" + _varint(len(extra)) + extra
    chain = b"\x0a" + _varint(len(stage)) + stage
    return data + b"\x0a" + _varint(len(chain)) + chain  # a second `chain` field merges a stage in


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def png_claiming(side: int) -> bytes:
    """A PNG whose header claims side x side pixels, followed by almost no pixel data."""
    small = bomb_png(64)
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return small[:8] + chunk + small[33:]


def attach(name: str, data: bytes) -> gateway_pb2.ChainRequest:
    return chain_request({"stages": [{"name": name, "type": "source-image"}]}, [(name, "image", data)])


# name -> (request, message fragments). Every one is INVALID_ARGUMENT.
HOSTILE = {
    "format spec in template": (save("{index:>100000000}.png"), ["stage 'save' (persist-disk)", "param 'filename'", "format spec"]),
    "attribute access in template": (save("{job.__class__}.png"), ["param 'filename'", "unknown field {job.__class__}"]),
    "conversion in template": (save("{job!r}.png"), ["param 'filename'", "{job!r}", "conversion"]),
    "positional field in template": (save("{}.png"), ["param 'filename'", "empty field"]),
    "unbalanced brace": (save("{job.png"), ["param 'filename'", "literal braces"]),
    "256-byte file name": (save("a" * 252 + ".png"), ["param 'filename'", "256 bytes long", "at most 255"]),
    "path over PATH_MAX": (save("/".join(["d" * 250] * 17) + "/x.png"), ["param 'filename'", "at most 4095"]),
    "extension against format": (save("x.jpg", format="png"), ["param 'filename'", "'.jpg' does not match format 'png'"]),
    "unknown extension": (save("x.gif"), ["param 'filename'", "cannot tell the format"]),
    "reserved staging folder": (save(".tilechain/staging/x.png"), ["param 'filename'", "reserved"]),
    "10**400": (up_json("1" + "0" * 400), ["stage 'up' (upscale-simple)", "param 'scale'", "401-digit number does not fit"]),
    "5000 digits": (up_json("9" * 5000), ["stage 'up' (upscale-simple)", "param 'scale'", "not a finite number"]),
    "1e400": (up_json("1e400"), ["param 'scale'", "inf is not a finite number"]),
    "NaN": (up_json("NaN"), ["param 'scale'", "nan is not a finite number"]),
    "2**60": (up_json(str(2**60)), ["param 'scale'", "does not fit", "2^53"]),
    "20-deep params": (faces_chain(20), ["stage 'fix' (correct-gfpgan)", "param 'faces'", "nested more than 8"]),
    "1000-deep params": (faces_chain(1000), ["stage 'fix' (correct-gfpgan)", "param 'faces'", "nested more than 8"]),
    "100000-deep params": (faces_chain(100000), ["stage 'fix' (correct-gfpgan)", "param 'faces'", "nested more than 8"]),
    "100000-deep, not in params": ('{"stages": [], "x": %s}' % ("[" * 100000 + "]" * 100000), ["chain_json", "nested too deeply"]),
    "inf in a Struct": (struct_chain({"scale": float("inf")}), ["stage 'up' (upscale-simple)", "param 'scale'", "not a finite number"]),
    "deep Struct": (struct_chain({"scale": nested(30)}), ["stage 'up' (upscale-simple)", "param 'scale'", "nested more than 8"]),
    "transport_tile 1": (chain_request({"stages": [NOISE]}, transport_tile=1), ["transport_tile: 1 is below the minimum 16"]),
    "transport_tile 100000": (chain_request({"stages": [NOISE]}, transport_tile=100000), ["transport_tile", "above the maximum 4096"]),
    "job pixels over the cap": (
        chain_request({"stages": [{"name": "many", "type": "source-noise", "params": {"width": 1024, "height": 1024, "count": 9}}]}),
        ["stage 'many' (source-noise)", "param 'count'", "TILECHAIN_MAX_JOB_PIXELS"],
    ),
    "7.8 KB PNG claiming 8000x8000": (attach("load", bomb_png(8000)), ["stage 'load' (source-image)", "attached image", "decompression", "TILECHAIN_MAX_DECODE_RATIO"]),
    "PNG claiming 100000x100000": (attach("load", png_claiming(100000)), ["stage 'load' (source-image)", "attached image", "pixels"]),
    "not an accepted format": (attach("load", b"P6\n8 8\n255\n" + bytes(192)), ["stage 'load' (source-image)", "accepted format"]),
    "huge stage name": (chain_request({"stages": [dict(NOISE, name="n" * 100000)]}), ["stages[0]", "at most 128"]),
}

JOB_PIXELS = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def strict(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A second gateway on the test stack's services, with production limits (8192² canvases,
    so that the decompression-ratio check, not the pixel limit, meets the 8000² PNG) and a small
    per-job pixel cap."""
    addresses = dict(stack.addresses, gateway=f"127.0.0.1:{free_port()}")
    gateway = Stack(addresses, tmp_path_factory.mktemp("strict-gateway"))
    gateway.start(components=("gateway",), extra_env={
        "TILECHAIN_MAX_PIXELS": str(8192 * 8192),
        "TILECHAIN_MAX_JOB_PIXELS": str(JOB_PIXELS),
    })
    yield gateway
    gateway.stop()


def raw_run(address: str, data: bytes) -> grpc.RpcError:
    """RunChain with a request given as bytes."""
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_stream("/tilechain.v1.Gateway/RunChain", request_serializer=None,
                                    response_deserializer=gateway_pb2.JobEvent.FromString)
        with pytest.raises(grpc.RpcError) as info:
            list(call(data, timeout=30))
    return info.value


def send(address: str, request) -> grpc.RpcError:
    if isinstance(request, bytes):
        return raw_run(address, request)
    if isinstance(request, (dict, str)):
        request = chain_request(request)
    with pytest.raises(grpc.RpcError) as info:
        run_events(connect(address), request)
    return info.value


def assert_serves(address: str) -> None:
    events = run_events(connect(address), chain_request({"stages": [NOISE, {"name": "up", "type": "upscale-simple"}]}))
    assert events[-1].status.state == gateway_pb2.JOB_STATE_SUCCEEDED


def assert_clean(message: str) -> None:
    assert not re.search(r"0x[0-9a-fA-F]{6,}", message) and "object at" not in message and "Traceback" not in message
    assert str(Path.cwd()) not in message and "/tmp/" not in message and "site-packages" not in message


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_request_is_refused_by_name(strict: Stack, output_root: Path, case: str) -> None:
    request, fragments = HOSTILE[case]
    before = sorted(output_root.rglob("*"))
    error = send(strict.addresses["gateway"], request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    for fragment in fragments:
        assert fragment in error.details()
    assert_clean(error.details())
    assert sorted(output_root.rglob("*")) == before  # nothing ran, nothing written
    assert_serves(strict.addresses["gateway"])


def test_struct_deeper_than_protobuf_parses_is_invalid_argument(strict: Stack) -> None:
    error = raw_run(strict.addresses["gateway"], deep_struct_chain(1000))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "RunChain: the request message is nested too deeply" in error.details()
    assert_serves(strict.addresses["gateway"])


def test_the_same_bomb_meets_the_pixel_limit_on_the_test_gateway(gateway) -> None:
    with pytest.raises(grpc.RpcError) as info:
        run_events(gateway, attach("load", bomb_png(8000)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stage 'load' (source-image): attached image is 8000x8000" in info.value.details()
    assert "TILECHAIN_MAX_PIXELS" in info.value.details()


def test_gateway_memory_stays_flat_over_16_of_each(strict: Stack) -> None:
    address, pid = strict.addresses["gateway"], strict.processes["gateway"].pid
    cases = [request for request, _ in HOSTILE.values()] + [deep_struct_chain(1000)]
    for request in cases:  # once first: imports and caches settle
        assert send(address, request).code() == grpc.StatusCode.INVALID_ARGUMENT
    before = process_memory(pid)
    for _ in range(16):
        for request in cases:
            assert send(address, request).code() == grpc.StatusCode.INVALID_ARGUMENT
    after = process_memory(pid)
    mib = 1024
    # growth only: the allocator handing pages back (RSS falling) is no failure
    assert after["VmRSS"] - before["VmRSS"] <= 20 * mib, (before, after)
    assert after["VmHWM"] - before["VmHWM"] <= 20 * mib, (before, after)  # no transient spike either


def test_services_refuse_the_same_when_called_directly(stack: Stack) -> None:
    """A caller that skips the gateway meets the same checks in the services."""
    from tilechain.v1 import stage_pb2, stage_pb2_grpc, tiles_pb2

    canvas = tiles_pb2.Canvas(id=0, width=16, height=16, format=tiles_pb2.PIXEL_FORMAT_RGB8, role=tiles_pb2.CANVAS_ROLE_IMAGE)
    upscale = stage_pb2_grpc.StageStub(grpc.insecure_channel(stack.addresses["upscale"]))
    start = stage_pb2.StageStart(name="up", type="upscale-simple", inputs=[canvas], transport_tile=1)
    with pytest.raises(grpc.RpcError) as info:
        list(upscale.Process(iter([stage_pb2.StageInput(start=start)]), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stage 'up' (upscale-simple): transport_tile: 1 is below the minimum 16" in info.value.details()

    start = stage_pb2.StageStart(name="up", type="upscale-simple", inputs=[canvas], params=dict_to_struct({"scale": float("inf")}))
    with pytest.raises(grpc.RpcError) as info:
        upscale.Plan(start, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stage 'up' (upscale-simple): param 'scale': inf is not a finite number" in info.value.details()

    persist = stage_pb2_grpc.StageStub(grpc.insecure_channel(stack.addresses["persist"]))
    start = stage_pb2.StageStart(name="save", type="persist-disk", inputs=[canvas], params=dict_to_struct({"filename": "{index:>100000000}.png"}))
    with pytest.raises(grpc.RpcError) as info:
        persist.Plan(start, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stage 'save' (persist-disk): param 'filename': {index:>100000000}: fields take no format spec" in info.value.details()
