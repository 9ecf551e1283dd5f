"""persist-disk stages a job's files and publishes them only when the whole job succeeds: a
cancelled or failed job leaves no output, a retried attempt replaces its earlier attempt's
files, and a persist service cleans what a dead predecessor staged. Names: a 255-byte file name
works, the format follows the extension."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from tilechain.client import TileAssembler, chain_request
from tilechain.services.core.codecs import decode_image, encode_image, read_metadata, tile_message
from tilechain.services.core.tiles import Rect, transport_grid
from tilechain.stack import Stack
from tilechain.v1 import gateway_pb2, stage_pb2, stage_pb2_grpc, tiles_pb2

from .conftest import free_port, run_events

STAGING = Path(".tilechain", "staging")


def held_chain(filename: str) -> dict:
    """noise -> save -> x4 -> crop: after 'save' has staged its file, the later stages return
    tens of thousands of tiles, which hold the job while the caller does not read them."""
    return {"stages": [
        {"name": "noise", "type": "source-noise", "params": {"width": 512, "height": 512, "seed": 5}},
        {"name": "save", "type": "persist-disk", "params": {"filename": filename}},
        {"name": "up", "type": "upscale-simple", "params": {"scale": 4, "method": "nearest"}},
        {"name": "crop", "type": "reduce-crop", "params": {"width": 2048, "height": 2048}},
    ]}


def run_until_saved(gateway, filename: str):
    """Start a held job; return (call, job id) once 'save' has finished, i.e. staged its file."""
    call = gateway.RunChain(chain_request(held_chain(filename), return_tiles=gateway_pb2.TILE_RETURN_ALL, transport_tile=16))
    for event in call:
        if (event.WhichOneof("kind") == "stage" and event.stage.name == "save"
                and event.stage.kind == gateway_pb2.StageEvent.KIND_FINISHED):
            return call, event.job_id
    raise AssertionError("the job ended before 'save' finished")


def staged_files(output_root: Path) -> list[Path]:
    return sorted(p for p in (output_root / STAGING).rglob("*") if p.is_file())


def test_files_appear_only_when_the_job_succeeds(gateway, output_root: Path) -> None:
    call, job = run_until_saved(gateway, "publish/{job}.png")
    target = output_root / "publish" / f"{job}.png"
    assert not target.exists()  # staged, not published: the job is still running
    assert any(p.suffix == ".png" for p in staged_files(output_root))
    events = list(call)
    assert events[-1].status.state == gateway_pb2.JOB_STATE_SUCCEEDED
    artifacts = [e.artifact for e in events if e.WhichOneof("kind") == "artifact"]
    assert [a.path for a in artifacts] == [f"publish/{job}.png"] == [a.path for a in events[-1].status.artifacts]
    assert target.is_file() and read_metadata(target.read_bytes())["job"] == job
    assert artifacts[0].size_bytes == target.stat().st_size
    assert staged_files(output_root) == []


def test_a_cancelled_job_leaves_no_output(gateway, output_root: Path) -> None:
    call, job = run_until_saved(gateway, "cancel-after-save/{job}.png")
    assert staged_files(output_root)
    call.cancel()
    status = gateway.CancelJob(gateway_pb2.JobRef(job_id=job), timeout=60)  # returns once the job has ended
    assert status.state == gateway_pb2.JOB_STATE_CANCELLED
    assert not (output_root / "cancel-after-save").exists()
    assert staged_files(output_root) == []


def test_a_failed_job_leaves_no_output_and_takes_nothing(gateway, output_root: Path) -> None:
    """Someone else's file appears at the target while the job runs: the job fails with
    ALREADY_EXISTS at publishing, their file is untouched, nothing of the job remains."""
    call, job = run_until_saved(gateway, "fail-after-save/{job}.png")
    target = output_root / "fail-after-save" / f"{job}.png"
    target.parent.mkdir()
    target.write_bytes(b"theirs")
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "stage 'save' (persist-disk): param 'filename': fail-after-save/" in info.value.details()
    assert "nothing of the job was published" in info.value.details()
    assert target.read_bytes() == b"theirs"
    assert sorted(target.parent.iterdir()) == [target]
    assert staged_files(output_root) == []


def test_an_attachment_that_breaks_while_decoding_fails_the_job_by_name(gateway, output_root: Path) -> None:
    """The header is fine, the pixel data ends early: found while streaming, reported as the
    attachment's fault (not as a cancelled call), and the staged file of an earlier persist
    stage is discarded."""
    good = encode_image(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8), "png")
    broken = good[: len(good) // 2]
    chain = {"stages": [
        {"name": "noise", "type": "source-noise", "params": {"width": 64, "height": 64, "seed": 1}},
        {"name": "save", "type": "persist-disk", "params": {"filename": "broken/{job}.png"}},
        {"name": "mix", "type": "blend-linear"},
    ]}
    with pytest.raises(grpc.RpcError) as info:
        run_events(gateway, chain_request(chain, [("mix", "image", broken)]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert "stage 'mix' (blend-linear): attached image: not a readable image" in info.value.details()
    assert not (output_root / "broken").exists()
    assert staged_files(output_root) == []


def test_a_255_byte_name_is_written_and_the_format_follows_the_extension(gateway, output_root: Path) -> None:
    name = "n" * 251 + ".jpg"
    assert len(name.encode()) == 255
    chain = {"stages": [
        {"name": "noise", "type": "source-noise", "params": {"width": 40, "height": 30, "seed": 2}},
        {"name": "save", "type": "persist-disk", "params": {"filename": "long/" + name}},
    ]}
    status = run_events(gateway, chain_request(chain))[-1].status
    assert status.state == gateway_pb2.JOB_STATE_SUCCEEDED, status.message
    written = output_root / "long" / name
    assert status.artifacts[0].format == "jpeg"
    assert Image.open(written).format == "JPEG" and Image.open(written).size == (40, 30)


# --- at the service: attempts and clean-up -------------------------------------------------------


def persist_stub(stack: Stack) -> stage_pb2_grpc.StageStub:
    return stage_pb2_grpc.StageStub(grpc.insecure_channel(stack.addresses["persist"]))


def stage_one(stub, job: str, attempt: int, pixels: np.ndarray, filename: str) -> list[stage_pb2.StageOutput]:
    height, width, _ = pixels.shape
    canvas = tiles_pb2.Canvas(id=0, width=width, height=height, format=tiles_pb2.PIXEL_FORMAT_RGB8, role=tiles_pb2.CANVAS_ROLE_IMAGE)
    start = stage_pb2.StageStart(job_id=job, name="save", type="persist-disk", inputs=[canvas], attempt=attempt)
    start.params.update({"filename": filename})
    messages = [
        stage_pb2.StageInput(start=start),
        stage_pb2.StageInput(tile=tile_message(0, Rect(0, 0, width, height), pixels)),
        stage_pb2.StageInput(end=stage_pb2.InputEnd()),
    ]
    return list(stub.Process(iter(messages), timeout=30))


def test_a_retried_attempt_replaces_the_earlier_ones(stack: Stack, output_root: Path) -> None:
    stub = persist_stub(stack)
    job = f"retry-{os.getpid()}"
    target = output_root / "retry" / f"{job}.png"
    first, second, third = (np.full((8, 8, 3), v, np.uint8) for v in (10, 20, 30))
    outputs = stage_one(stub, job, 0, first, "retry/{job}.png")
    assert not any(o.WhichOneof("kind") == "artifact" for o in outputs)  # staged: nothing to report yet
    stage_one(stub, job, 1, second, "retry/{job}.png")  # attempt 0 died before its Finish
    result = stub.Finish(stage_pb2.FinishRequest(job_id=job, attempt=1, commit=True), timeout=30)
    assert [a.path for a in result.artifacts] == [f"retry/{job}.png"]
    assert sorted(target.parent.iterdir()) == [target]  # one file, attempt 1's
    assert np.asarray(Image.open(target))[0, 0, 0] == 20
    assert staged_files(output_root) == []
    # the job ran again after publishing (its gateway died before recording success): the
    # file is the job's own, so the new attempt replaces it
    stage_one(stub, job, 2, third, "retry/{job}.png")
    stub.Finish(stage_pb2.FinishRequest(job_id=job, attempt=2, commit=True), timeout=30)
    assert sorted(target.parent.iterdir()) == [target]
    assert np.asarray(Image.open(target))[0, 0, 0] == 30
    # another job may not take it
    with pytest.raises(grpc.RpcError) as info:
        stage_one(stub, "someone-else", 0, first, f"retry/{job}.png")
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # and an abort leaves nothing
    stage_one(stub, job + "-aborted", 0, first, "retry/{job}.png")
    stub.Finish(stage_pb2.FinishRequest(job_id=job + "-aborted", attempt=0, commit=False), timeout=30)
    assert not (output_root / "retry" / f"{job}-aborted.png").exists()
    assert staged_files(output_root) == []


def test_a_starting_persist_service_cleans_what_a_dead_one_staged(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    host = socket.gethostname()
    for job, pid in (("dead-job", dead.pid), ("live-job", os.getpid())):
        folder = root / STAGING / job
        folder.mkdir(parents=True)
        (folder / "0-save-0.png").write_bytes(b"staged")
        (folder / "0-save-0.png.json").write_text(json.dumps({"attempt": 0, "host": host, "pid": pid}))
    addresses = {"persist": f"127.0.0.1:{free_port()}"}
    service = Stack(addresses, tmp_path / "logs")
    service.start(components=("persist",), extra_env={"TILECHAIN_OUTPUT_ROOT": str(root)})
    try:
        assert not (root / STAGING / "dead-job").exists()
        assert sorted(p.name for p in (root / STAGING / "live-job").iterdir()) == ["0-save-0.png", "0-save-0.png.json"]
    finally:
        service.stop()


# --- PNG written as its rows complete, JPEG from the whole canvas -------------------------------


def persist_peaks(stack: Stack, gateway, chain: dict, transport_tile: int) -> tuple[gateway_pb2.JobStatus, np.ndarray, stage_pb2.ServiceStats]:
    """Run chain (its last stage a persist stage) with the persist service's peaks reset: its
    status, the image it returned, and the persist service's ServiceStats afterwards."""
    stub = persist_stub(stack)
    stub.Stats(stage_pb2.StatsRequest(wait_idle=True, reset_peaks=True), timeout=60)
    events = run_events(gateway, chain_request(chain, return_tiles=gateway_pb2.TILE_RETURN_FINAL, transport_tile=transport_tile), timeout=120)
    images = TileAssembler()
    for event in events:
        if event.WhichOneof("kind") == "tile":
            images.add(event.tile)
    [image] = images.images.values()
    return events[-1].status, image, stub.Stats(stage_pb2.StatsRequest(wait_idle=True), timeout=60)


def test_a_png_is_written_band_by_band_and_a_jpeg_from_the_whole_canvas(stack: Stack, gateway, output_root: Path) -> None:
    """A 1024x768 image in 128-px transport tiles, from a source that finishes rows in order:
    persist-disk writes the PNG a row of tiles at a time, holding at most two such bands (the
    whole-canvas path held all 2.25 MiB), and the file is exactly the pixels that went
    through; a JPEG is still encoded from the whole canvas, which the counters show."""
    width, height, edge = 1024, 768, 128
    canvas_bytes, band_bytes = width * height * 3, edge * width * 3
    noise_stage = {"name": "noise", "type": "source-noise", "params": {"width": width, "height": height, "seed": 6, "method": "gaussian"}}
    chain = {"stages": [noise_stage, {"name": "save", "type": "persist-disk", "params": {"filename": "bands/{job}.png"}}]}
    status, image, stats = persist_peaks(stack, gateway, chain, edge)
    assert status.state == gateway_pb2.JOB_STATE_SUCCEEDED, status.message
    [artifact] = status.artifacts
    data = (output_root / artifact.path).read_bytes()
    assert len(data) == artifact.size_bytes and hashlib.sha256(data).hexdigest() == artifact.sha256
    assert np.array_equal(decode_image(data), image)
    assert read_metadata(data)["job"] == status.job_id
    assert 0 < stats.peak_output_bytes <= 2 * band_bytes < canvas_bytes / 2
    assert stats.peak_input_bytes == 0  # tiles pass straight through

    chain["stages"][1]["params"]["filename"] = "bands/{job}.jpg"
    status, image, stats = persist_peaks(stack, gateway, chain, edge)
    assert status.state == gateway_pb2.JOB_STATE_SUCCEEDED, status.message
    written = decode_image((output_root / status.artifacts[0].path).read_bytes())
    assert np.array_equal(written, decode_image(encode_image(image, "jpeg", quality=95)))  # what Pillow makes of it
    assert stats.peak_output_bytes >= canvas_bytes


def streamed_partly(stub, job: str, stage_type: str, params: dict, pixels: np.ndarray, edge: int, send_rows: int, then: str):
    """Stream pixels into a persist stage at its service: the tiles of the first send_rows
    rows, and return (the call, an event) once the stage has passed them all on, i.e. has
    written the bands of rows they complete. Setting the event ends the input there, early
    (then "end"), or leaves it open (then "cancel": the caller cancels the call)."""
    height, width, _ = pixels.shape
    canvas = tiles_pb2.Canvas(id=0, width=width, height=height, format=tiles_pb2.PIXEL_FORMAT_RGB8, role=tiles_pb2.CANVAS_ROLE_IMAGE)
    start = stage_pb2.StageStart(job_id=job, name="save", type=stage_type, inputs=[canvas], attempt=1, transport_tile=edge)
    start.params.update(params)
    rects = [r for r in transport_grid(width, height, edge) if r.y1 <= send_rows]
    passed = threading.Event()
    finish = threading.Event()

    def messages():
        yield stage_pb2.StageInput(start=start)
        for rect in rects:
            yield stage_pb2.StageInput(tile=tile_message(0, rect, pixels))
        passed.wait(60)
        finish.wait(60)
        if then == "end":
            yield stage_pb2.StageInput(end=stage_pb2.InputEnd())

    call = stub.Process(messages(), timeout=60)
    seen = 0
    try:
        for output in call:
            seen += output.WhichOneof("kind") == "tile"
            if seen == len(rects):
                passed.set()
                return call, finish
    except grpc.RpcError as error:
        raise AssertionError(f"the stream failed early: {error.details()}") from None
    raise AssertionError("the stream ended early")


def test_a_png_half_written_when_the_stream_fails_or_is_cancelled_leaves_nothing(stack: Stack, output_root: Path) -> None:
    stub = persist_stub(stack)
    pixels = np.random.default_rng(8).integers(0, 256, (256, 200, 3), dtype=np.uint8)
    for then in ("end", "cancel"):
        job = f"half-{then}-{os.getpid()}"
        call, finish = streamed_partly(stub, job, "persist-disk", {"filename": f"half/{job}.png"}, pixels, 64, 128, then)
        # two bands of rows are in the staged file; it has no record yet, so it cannot be published
        [staged] = staged_files(output_root)
        assert staged.suffix == ".png"
        if then == "end":
            finish.set()
            with pytest.raises(grpc.RpcError) as info:
                list(call)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "input ended before" in info.value.details()
            assert staged_files(output_root) == []  # discarded before the error came back
        else:
            call.cancel()
            finish.set()  # lets the request thread go; the call is already cancelled
        stub.Finish(stage_pb2.FinishRequest(job_id=job, attempt=1, commit=True), timeout=30)  # nothing to publish
        assert not (output_root / "half").exists()
        assert staged_files(output_root) == []
