"""Cancelling a RunChain stops the work in every service of the chain."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import grpc
import pytest

from tilechain.client import chain_request
from tilechain.stack import Stack
from tilechain.v1 import gateway_pb2, stage_pb2, stage_pb2_grpc


def stats(stack: Stack, family: str, wait_idle: bool = False) -> stage_pb2.ServiceStats:
    stub = stage_pb2_grpc.StageStub(grpc.insecure_channel(stack.addresses[family]))
    return stub.Stats(stage_pb2.StatsRequest(wait_idle=wait_idle), timeout=60)


# A job that is surely still running when its first progress event arrives: 500 denoising
# steps (the most a stage takes) cannot end in the moment between that event and the cancel.
SLOW_GEN = {"name": "gen", "type": "source-txt2img", "params": {"width": 64, "height": 64, "steps": 500, "seed": 3}}


def first_progress(events, stage: str) -> None:
    """Read events until the stage's first progress: its stream is open and working."""
    for event in events:
        if event.WhichOneof("kind") == "progress" and event.progress.name == stage:
            return
    raise AssertionError(f"no progress from {stage}")


def test_cancelled_run_stops_the_services(gateway, stack: Stack, output_root: Path) -> None:
    chain = {"stages": [SLOW_GEN, {"name": "save", "type": "persist-disk", "params": {"filename": "cancelled/{job}.png"}}]}
    before = {f: stats(stack, f) for f in ("source", "persist")}
    call = gateway.RunChain(chain_request(chain))
    first_progress(call, "gen")
    call.cancel()

    after = {f: stats(stack, f, wait_idle=True) for f in before}  # every stream has ended
    cancelled = {f: after[f].streams_cancelled - before[f].streams_cancelled for f in before}
    assert cancelled == {"source": 1, "persist": 1}
    assert after["persist"].streams_finished == before["persist"].streams_finished
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
    # a queue event first if it still waited when the watch began, then the stages
    assert [e.WhichOneof("kind") for e in events if e.WhichOneof("kind") != "queue"][0] == "stage"

    try:
        gateway.GetJob(gateway_pb2.JobRef(job_id="nope"))
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "job_id" in error.details()
    else:
        raise AssertionError("GetJob of an unknown job succeeded")


def test_deadline_reaches_every_service(gateway, stack: Stack, output_root: Path) -> None:
    chain = {"stages": [SLOW_GEN, {"name": "save", "type": "persist-disk", "params": {"filename": "deadline/{job}.png"}}]}
    before = stats(stack, "persist")
    # the model loaded beforehand, so that the short deadline below is spent on the job
    warm = {"stages": [dict(SLOW_GEN, params={**SLOW_GEN["params"], "steps": 1})]}
    assert list(gateway.RunChain(chain_request(warm), timeout=120))[-1].status.state == gateway_pb2.JOB_STATE_SUCCEEDED
    call = gateway.RunChain(chain_request(chain), timeout=8.0)
    first_progress(call, "gen")
    # Freeze the source service mid-stream: the job cannot end before its deadline, however
    # fast this machine is, so the deadline is what stops it.
    source = stack.processes["source"].pid
    os.kill(source, signal.SIGSTOP)
    try:
        assert call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        after = stats(stack, "persist", wait_idle=True)
    finally:
        os.kill(source, signal.SIGCONT)
    # the persist stream ended unfinished: cancelled, or failed when the deadline fired inside
    # the service first (both seen, depending on which side notices the deadline first)
    stopped = lambda s: s.streams_cancelled + s.streams_failed  # noqa: E731
    assert stopped(after) == stopped(before) + 1
    assert after.streams_finished == before.streams_finished
    source_after = stats(stack, "source", wait_idle=True)
    assert source_after.active_streams == 0
    assert not (output_root / "deadline").exists() or not any((output_root / "deadline").iterdir())


class GoneCaller:
    """A ServicerContext whose caller has cancelled: answering it is a mistake."""

    def cancelled(self) -> bool:
        return True

    async def abort(self, code, details):
        raise AssertionError(f"abort({code}, {details!r}) on a cancelled call")


class JustGoneCaller(GoneCaller):
    """The cancel has not reached the call's state yet, but the status cannot be sent any more
    (gRPC raises its ExecuteBatchError from abort)."""

    def cancelled(self) -> bool:
        return False

    async def abort(self, code, details):
        raise RuntimeError('Failed "execute_batch"')


@pytest.mark.parametrize("caller", [GoneCaller, JustGoneCaller])
def test_input_that_ends_because_the_caller_cancelled_counts_as_cancelled(caller, tmp_path: Path) -> None:
    """The caller cancels a persist stream mid-image: its input ends early, which the stage
    notices first ("input ended before ... complete"). That is a cancel, not a failure, and
    the service answers nobody (gRPC refuses an abort on a cancelled call)."""
    import asyncio

    import numpy as np

    from tilechain.services.core.codecs import tile_message
    from tilechain.services.core.config import Settings
    from tilechain.services.core.servicer import StageServicer
    from tilechain.services.core.tiles import Rect
    from tilechain.v1 import tiles_pb2

    servicer = StageServicer("persist", Settings(output_root=tmp_path.resolve()))
    canvas = tiles_pb2.Canvas(id=0, width=64, height=64, format=tiles_pb2.PIXEL_FORMAT_RGB8, role=tiles_pb2.CANVAS_ROLE_IMAGE)
    start = stage_pb2.StageStart(job_id="gone", name="save", type="persist-disk", inputs=[canvas], attempt=1, transport_tile=32)
    start.params.update({"filename": "gone/{job}.png"})
    pixels = np.zeros((64, 64, 3), np.uint8)

    async def input_cut_short():
        yield stage_pb2.StageInput(start=start)
        yield stage_pb2.StageInput(tile=tile_message(0, Rect(0, 0, 32, 32), pixels[:32, :32]))

    async def run() -> list:
        return [m async for m in servicer.Process(input_cut_short(), caller())]

    asyncio.run(run())
    assert (servicer.stats.streams_cancelled, servicer.stats.streams_failed) == (1, 0)
    assert not (tmp_path / "gone").exists()
