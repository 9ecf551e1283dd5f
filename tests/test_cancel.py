"""Cancelling a RunChain stops the work in every service of the chain."""

from __future__ import annotations

from pathlib import Path

import grpc

from tilechain.client import chain_request
from tilechain.stack import Stack
from tilechain.v1 import gateway_pb2, stage_pb2, stage_pb2_grpc


def stats(stack: Stack, family: str, wait_idle: bool = False) -> stage_pb2.ServiceStats:
    stub = stage_pb2_grpc.StageStub(grpc.insecure_channel(stack.addresses[family]))
    return stub.Stats(stage_pb2.StatsRequest(wait_idle=wait_idle), timeout=60)


def test_cancelled_run_stops_the_services(gateway, stack: Stack, output_root: Path) -> None:
    chain = {
        "stages": [
            {"name": "noise", "type": "source-noise", "params": {"width": 512, "height": 512, "seed": 3}},
            {"name": "up", "type": "upscale-simple", "params": {"scale": 4}},
            {"name": "save", "type": "persist-disk", "params": {"filename": "cancelled/{job}.png"}},
        ]
    }
    before = {f: stats(stack, f) for f in ("source", "upscale", "persist")}
    # Returning every tile while not reading them fills the gateway's buffers, so the job is
    # held mid-flight until we cancel: the cancel lands on running streams, not by luck.
    call = gateway.RunChain(chain_request(chain, return_tiles=gateway_pb2.TILE_RETURN_ALL, transport_tile=64))
    for event in call:
        if event.WhichOneof("kind") == "progress" and event.progress.name == "up":
            break
    call.cancel()

    after = {f: stats(stack, f, wait_idle=True) for f in before}  # every stream has ended
    cancelled = {f: after[f].streams_cancelled - before[f].streams_cancelled for f in before}
    assert cancelled["persist"] == 1
    assert after["persist"].streams_finished == before["persist"].streams_finished
    assert sum(cancelled.values()) >= 1
    assert not (output_root / "cancelled").exists() or not any((output_root / "cancelled").iterdir())


def test_cancel_job_and_job_api(gateway, stack: Stack) -> None:
    chain = {"stages": [
        {"name": "noise", "type": "source-noise", "params": {"width": 512, "height": 512, "seed": 3}},
        {"name": "up", "type": "upscale-simple", "params": {"scale": 4}},
    ]}
    ref = gateway.SubmitChain(chain_request(chain, transport_tile=64))
    assert ref.job_id
    status = gateway.CancelJob(ref)
    assert status.state in (gateway_pb2.JOB_STATE_CANCELLED, gateway_pb2.JOB_STATE_SUCCEEDED)
    assert gateway.GetJob(ref).state == status.state
    events = list(gateway.WatchJob(ref))
    assert events[-1].status.state == status.state

    ref = gateway.SubmitChain(chain_request({"stages": chain["stages"][:1]}))
    events = list(gateway.WatchJob(ref))
    assert events[-1].status.state == gateway_pb2.JOB_STATE_SUCCEEDED
    assert events[0].WhichOneof("kind") == "stage"

    try:
        gateway.GetJob(gateway_pb2.JobRef(job_id="nope"))
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "job_id" in error.details()
    else:
        raise AssertionError("GetJob of an unknown job succeeded")


def test_deadline_reaches_every_service(gateway, stack: Stack, output_root: Path) -> None:
    chain = {
        "stages": [
            {"name": "noise", "type": "source-noise", "params": {"width": 512, "height": 512, "seed": 4}},
            {"name": "up", "type": "upscale-simple", "params": {"scale": 4}},
            {"name": "save", "type": "persist-disk", "params": {"filename": "deadline/{job}.png"}},
        ]
    }
    before = stats(stack, "persist")
    # Tiles are returned but never read, so the job cannot finish before its deadline.
    call = gateway.RunChain(chain_request(chain, return_tiles=gateway_pb2.TILE_RETURN_ALL, transport_tile=64), timeout=2.0)
    assert call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    after = stats(stack, "persist", wait_idle=True)
    # the persist stream ended unfinished: cancelled, or failed when the deadline fired inside
    # the service first (both seen, depending on which side notices the deadline first)
    stopped = lambda s: s.streams_cancelled + s.streams_failed  # noqa: E731
    assert stopped(after) == stopped(before) + 1
    assert after.streams_finished == before.streams_finished
    assert not (output_root / "deadline").exists() or not any((output_root / "deadline").iterdir())
