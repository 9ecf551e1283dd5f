"""The REST routes through the real Envoy (the Gateway's google.api.http options), beside the
POST /tilechain.v1.Gateway/<Method> ones: the stage list, submitting an onnx-web document,
polling a job's onnx-web-style summary, watching and cancelling it, running a chain as a
stream; errors are JSON with the gRPC code and message. onnx-web's params that have no effect
come back as notices over gRPC too."""

from __future__ import annotations

import json

import grpc

from tilechain.client import chain_request
from tilechain.stack import Stack
from tilechain.v1 import gateway_pb2

from .conftest import run_events
from .test_onnx_web import rest


def lines(body: bytes) -> list[dict]:
    return [json.loads(line) for line in body.decode().splitlines() if line.strip()]


def test_get_stages(stack: Stack) -> None:
    status, body = rest(stack, "GET", "/v1/stages")
    assert status == 200
    types = {s["type"] for c in json.loads(body)["catalogs"] for s in c["stages"]}
    assert {"persist-s3", "source-s3", "source-url", "upscale-simple"} <= types


def test_run_a_chain_as_a_stream(stack: Stack) -> None:
    document = {"stages": [
        {"name": "noise", "type": "source-noise", "params": {"width": "64", "height": 64, "seed": 4, "noise_source": "gaussian"}},
        {"name": "save", "type": "persist-disk", "params": {"output": "rest-run/{job}.{ext}", "tile_order": "grid"}},
    ]}
    status, body = rest(stack, "POST", "/v1/jobs:run", document)
    events = lines(body)
    assert status == 200 and events[-1]["status"]["state"] == "JOB_STATE_SUCCEEDED"
    [artifact] = events[-1]["status"]["artifacts"]
    assert artifact["path"].startswith("rest-run/") and artifact["width"] == 64
    notices = [e["notice"] for e in events if "notice" in e]
    assert notices == [{"stage_index": 1, "name": "save", "message": "param 'tile_order' (onnx-web): each stage has its own tile order (spiral for diffusion stages, grid for the others)"}]
    noise = events[-1]["status"]["artifacts"][0]
    assert noise["format"] == "png"


def test_submit_poll_and_cancel(stack: Stack) -> None:
    """A long diffusion job, cancelled at once: GET reports it cancelled with the gRPC code,
    :watch replays its events to the end, and a second cancel is harmless."""
    document = {"stages": [{"name": "gen", "type": "source-txt2img", "params": {"width": 64, "height": 64, "steps": 500, "seed": 1}}]}
    status, body = rest(stack, "POST", "/v1/jobs", document)
    assert status == 200, body
    job = json.loads(body)["job_id"]
    status, body = rest(stack, "POST", f"/v1/jobs/{job}:cancel")
    assert status == 200
    cancelled = json.loads(body)
    assert cancelled["state"] == "JOB_STATE_CANCELLED" and cancelled["code"] == grpc.StatusCode.CANCELLED.value[0]
    assert cancelled["stages"] == {"current": 0, "total": 1}
    assert cancelled.get("steps", {}).get("current", 0) < 500
    status, body = rest(stack, "GET", f"/v1/jobs/{job}")
    assert status == 200 and json.loads(body)["state"] == "JOB_STATE_CANCELLED"
    status, body = rest(stack, "GET", f"/v1/jobs/{job}:watch")
    assert status == 200 and lines(body)[-1]["status"]["state"] == "JOB_STATE_CANCELLED"
    assert rest(stack, "POST", f"/v1/jobs/{job}:cancel")[0] == 200


def test_progress_summary_counts_steps_and_tiles(gateway) -> None:
    chain = {"stages": [
        {"name": "gen", "type": "source-txt2img", "params": {"width": 64, "height": 64, "steps": 3, "seed": 2}},
        {"name": "up", "type": "upscale-simple", "params": {"scale": 2}},
    ]}
    request = chain_request(chain, return_tiles=gateway_pb2.TILE_RETURN_NONE)
    ref = gateway.SubmitChain(request, timeout=30)
    events = list(gateway.WatchJob(ref, timeout=60))
    assert events[-1].status.state == gateway_pb2.JOB_STATE_SUCCEEDED
    status = gateway.GetJob(ref, timeout=10)
    assert (status.stages.current, status.stages.total) == (2, 2)
    assert (status.steps.current, status.steps.total) == (3, 3)
    assert status.tiles.current == status.tiles.total == 2  # one processing tile each


def test_errors_are_json(stack: Stack) -> None:
    status, body = rest(stack, "GET", "/v1/jobs/no-such-job")
    assert status == 404 and json.loads(body)["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    status, body = rest(stack, "POST", "/v1/jobs", {"stages": [{"name": "dat", "type": "upscale-dat", "params": {}}]})
    error = json.loads(body)
    assert status == 400 and error["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "stage 'dat' (upscale-dat): unknown stage type: onnx-web has it, tilechain does not (yet)" in error["message"]
    status, body = rest(stack, "POST", "/v1/jobs", {"stages": [{"name": "up", "type": "upscale-simple", "params": {"scael": 2}}]})
    error = json.loads(body)
    assert status == 400 and "stage 'up' (upscale-simple): param 'scael': unknown param" in error["message"]
    status, body = rest(stack, "POST", "/v1/jobs", {"stages": [], "unknown": 1})
    assert status == 400 and json.loads(body)["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]  # the transcoder's, as JSON


def test_notices_over_grpc_and_platform(gateway) -> None:
    document = {
        "platform": "cuda",
        "defaults": {"txt2img": {"width": 64}, "img2img": {"strength": 0.5}},
        "stages": [
            {"name": "noise", "type": "source-noise", "params": {"width": 32, "height": 32, "seed": 1}},
            {"name": "save", "type": "persist-disk", "params": {"tiles": "hd8k", "filename": "notices/{job}.png"}},
        ],
    }
    events = run_events(gateway, chain_request(json.dumps(document)))
    assert events[-1].status.state == gateway_pb2.JOB_STATE_SUCCEEDED
    notices = [(e.notice.name, e.notice.message) for e in events if e.WhichOneof("kind") == "notice"]
    assert notices[0] == ("noise", "platform 'cuda' (onnx-web): each stage runs on its service's device (TILECHAIN_DEVICE on the service); a chain cannot choose it")
    assert ("noise", "defaults.txt2img (onnx-web): no stage of this chain takes them (source-txt2img)") in notices
    assert any(name == "save" and "param 'tiles' (onnx-web)" in message for name, message in notices)
    first_stage_event = next(i for i, e in enumerate(events) if e.WhichOneof("kind") == "stage")
    before = {events[i].WhichOneof("kind") for i in range(first_stage_event)}
    assert before == {"queue", "notice"}  # the notices come before any stage starts (after its place in the queue)
