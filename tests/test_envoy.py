"""Envoy in front of the gateway (the real envoy binary, started by the stack fixture): gRPC,
JSON over HTTP through the gRPC-JSON transcoder, and gRPC-Web, all on the one port."""

from __future__ import annotations

import base64
import http.client
import json
import struct
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from tilechain.client import connect
from tilechain.envoy import ADMIN_ENV, CORS_ENV, binary, descriptor_set_from_stubs, render, render_yaml, split_address
from tilechain.services.core.codecs import encode_image
from tilechain.ports import unused_port
from tilechain.stack import Stack
from tilechain.v1 import gateway_pb2

GATEWAY_PATH = "/tilechain.v1.Gateway"


def post(stack: Stack, path: str, body: bytes, content_type: str = "application/json", headers: dict | None = None) -> tuple[http.client.HTTPResponse, bytes]:
    host, port = split_address(stack.addresses["envoy"])
    connection = http.client.HTTPConnection(host, port, timeout=60)
    try:
        connection.request("POST", path, body=body, headers={"content-type": content_type, **(headers or {})})
        response = connection.getresponse()
        return response, response.read()
    finally:
        connection.close()


def post_json(stack: Stack, method: str, payload: dict) -> tuple[http.client.HTTPResponse, bytes]:
    return post(stack, f"{GATEWAY_PATH}/{method}", json.dumps(payload).encode())


def stage_types(catalogs: list) -> set[str]:
    return {stage["type"] for catalog in catalogs for stage in catalog["stages"]}


def test_grpc_through_envoy(stack: Stack) -> None:
    stub = connect(stack.addresses["envoy"])
    reply = stub.ListStages(gateway_pb2.ListStagesRequest(), timeout=10)
    assert "upscale-simple" in {s.type for c in reply.catalogs for s in c.stages}
    # the health service answers through Envoy too (the stack waits on it)
    with grpc.insecure_channel(stack.addresses["envoy"]) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_grpc_error_through_envoy(stack: Stack) -> None:
    stub = connect(stack.addresses["envoy"])
    request = gateway_pb2.ChainRequest(chain_json=json.dumps({"stages": [{"name": "bad", "type": "no-such-stage"}]}))
    with pytest.raises(grpc.RpcError) as info:
        list(stub.RunChain(request, timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "bad" in info.value.details()


def test_json_list_stages(stack: Stack) -> None:
    response, body = post_json(stack, "ListStages", {})
    assert response.status == 200, body
    assert response.getheader("content-type") == "application/json"
    reply = json.loads(body)
    assert "upscale-simple" in stage_types(reply["catalogs"])
    # proto field names, primitive fields printed even when zero/false
    spec = next(s for c in reply["catalogs"] for s in c["stages"] if s["type"] == "upscale-simple")
    assert "needs_whole_canvas" in spec and spec["needs_whole_canvas"] is False


def run_chain_json(stack: Stack, payload: dict) -> list[dict]:
    response, body = post_json(stack, "RunChain", payload)
    assert response.status == 200, body
    # a server stream comes back as newline-delimited JSON, one JobEvent per line
    return [json.loads(line) for line in body.decode().splitlines() if line.strip()]


def test_json_run_chain_streams_events(stack: Stack, output_root: Path) -> None:
    chain = {
        "stages": [
            {"name": "noise", "type": "source-noise", "params": {"width": 64, "height": 64, "seed": 5}},
            {"name": "save", "type": "persist-disk", "params": {"filename": "envoy-json/{job}.{ext}"}},
        ]
    }
    events = run_chain_json(stack, {"chain": chain})
    assert len(events) > 2
    assert {"stage", "progress", "artifact", "status"} <= {k for e in events for k in e if k != "job_id"}
    status = events[-1]["status"]
    assert status["state"] == "JOB_STATE_SUCCEEDED"
    assert status["stages_total"] == status["stages_done"] == 2
    [artifact] = status["artifacts"]
    assert (artifact["width"], artifact["height"], artifact["format"]) == (64, 64, "png")
    path = output_root / artifact["path"]
    assert path.is_file() and path.stat().st_size == int(artifact["size_bytes"])  # int64 is a JSON string


def test_json_large_attachment(stack: Stack, output_root: Path) -> None:
    """A JSON body far over Envoy's default 1 MiB buffer: attachments are base64 in the JSON."""
    pixels = np.random.default_rng(3).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    png = encode_image(pixels, "png")
    assert len(png) > 2 * 1024 * 1024
    payload = {
        "chain_json": json.dumps({"stages": [
            {"name": "in", "type": "source-image"},
            {"name": "save", "type": "persist-disk", "params": {"filename": "envoy-json/large-{job}.{ext}"}},
        ]}),
        "attachments": [{"stage": "in", "role": "image", "data": base64.b64encode(png).decode()}],
    }
    events = run_chain_json(stack, payload)
    status = events[-1]["status"]
    assert status["state"] == "JOB_STATE_SUCCEEDED", status
    written = np.asarray(Image.open(output_root / status["artifacts"][0]["path"]))
    assert np.array_equal(written, pixels)


def test_json_bad_request_gives_http_error_with_grpc_status(stack: Stack) -> None:
    chain = {"stages": [{"name": "mystery", "type": "no-such-stage"}]}
    response, body = post_json(stack, "RunChain", {"chain": chain})
    assert response.status == 400, body  # INVALID_ARGUMENT
    error = json.loads(body)  # google.rpc.Status
    assert error["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "mystery" in error["message"] and "no-such-stage" in error["message"]


def test_json_malformed_body(stack: Stack) -> None:
    response, body = post(stack, f"{GATEWAY_PATH}/RunChain", b'{"chain": ')
    assert response.status == 400
    assert response.getheader("content-type") == "application/json"
    error = json.loads(body)  # Envoy says what it could not parse, as JSON like the gateway's errors
    assert error["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "Unexpected end of string" in error["message"]


def test_unknown_path_is_404_with_a_hint(stack: Stack) -> None:
    response, body = post_json(stack, "NoSuchMethod", {})
    assert response.status == 404
    assert response.getheader("content-type") == "application/json"
    error = json.loads(body)  # Envoy's own answers are JSON too, with the matching gRPC code
    assert error["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert "/tilechain.v1.Gateway/{Method}" in error["message"] and "GET /v1/stages" in error["message"]


def grpc_web_frames(body: bytes) -> list[tuple[int, bytes]]:
    frames, offset = [], 0
    while offset < len(body):
        flags, length = struct.unpack(">BI", body[offset : offset + 5])
        frames.append((flags, body[offset + 5 : offset + 5 + length]))
        offset += 5 + length
    assert offset == len(body), "truncated gRPC-Web frame"
    return frames


def test_grpc_web_list_stages(stack: Stack) -> None:
    message = gateway_pb2.ListStagesRequest().SerializeToString()
    request = struct.pack(">BI", 0, len(message)) + message
    response, body = post(
        stack, f"{GATEWAY_PATH}/ListStages", request,
        content_type="application/grpc-web+proto", headers={"x-grpc-web": "1", "accept": "application/grpc-web+proto"},
    )
    assert response.status == 200
    assert response.getheader("content-type").startswith("application/grpc-web")
    frames = grpc_web_frames(body)
    data = [payload for flags, payload in frames if not flags & 0x80]
    trailers = [payload for flags, payload in frames if flags & 0x80]
    assert len(data) == 1 and len(trailers) == 1
    reply = gateway_pb2.ListStagesResponse.FromString(data[0])
    assert "upscale-simple" in {s.type for c in reply.catalogs for s in c.stages}
    fields = dict(line.split(":", 1) for line in trailers[0].decode().strip().split("\r\n"))
    assert fields["grpc-status"].strip() == "0"


def test_render_keeps_admin_on_loopback(tmp_path: Path) -> None:
    descriptor = tmp_path / "d.binpb"
    descriptor.write_bytes(b"")
    with pytest.raises(ValueError, match="loopback"):
        render("0.0.0.0:8080", "gateway:50050", descriptor, admin="0.0.0.0:9901")
    config = render("[::]:8080", "gateway:50050", descriptor, admin=None)
    assert "admin" not in config
    listener = config["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": "::", "port_value": 8080, "ipv4_compat": True}


def test_descriptors_from_the_stubs_satisfy_envoy(tmp_path: Path) -> None:
    """An install without the .binpb data file falls back on the stubs' descriptors."""
    descriptor = tmp_path / "from-stubs.binpb"
    descriptor.write_bytes(descriptor_set_from_stubs())
    config = tmp_path / "envoy.yaml"
    config.write_text(render_yaml("127.0.0.1:8080", "127.0.0.1:50050", descriptor, embed_descriptor=True, admin=None))
    out = subprocess.run([binary(), "--mode", "validate", "--config-path", str(config)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


def test_cors_for_browser_apps(stack: Stack, tmp_path: Path) -> None:
    """A second Envoy, started as the stack starts its own, with one allowed origin."""
    origin = "http://localhost:5173"
    host, _ = split_address(stack.addresses["envoy"])
    port = unused_port(host)
    proxy = Stack({"envoy": f"{host}:{port}", "gateway": stack.addresses["gateway"]}, tmp_path)
    proxy.start(("envoy",), extra_env={CORS_ENV: origin, ADMIN_ENV: "off"})
    try:
        def preflight(from_origin: str) -> http.client.HTTPResponse:
            connection = http.client.HTTPConnection(host, port, timeout=30)
            headers = {"origin": from_origin, "access-control-request-method": "POST", "access-control-request-headers": "content-type,x-grpc-web"}
            connection.request("OPTIONS", f"{GATEWAY_PATH}/ListStages", headers=headers)
            response = connection.getresponse()
            response.read()
            connection.close()
            return response

        allowed = preflight(origin)
        assert allowed.status == 200
        assert allowed.getheader("access-control-allow-origin") == origin
        assert "grpc-status" in allowed.getheader("access-control-expose-headers")
        assert preflight("http://elsewhere.example").getheader("access-control-allow-origin") is None
        response, body = post(proxy, f"{GATEWAY_PATH}/ListStages", b"{}", headers={"origin": origin})
        assert response.status == 200 and response.getheader("access-control-allow-origin") == origin
        web = struct.pack(">BI", 0, 0)  # an empty ListStagesRequest, framed
        response, body = post(proxy, f"{GATEWAY_PATH}/ListStages", web, content_type="application/grpc-web+proto", headers={"origin": origin})
        assert response.status == 200 and response.getheader("access-control-allow-origin") == origin
    finally:
        proxy.stop()
