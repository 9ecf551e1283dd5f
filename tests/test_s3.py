"""persist-s3 and source-s3 against the stack's real S3 server (SeaweedFS): what persist-s3
writes boto3 reads back byte for byte; a PNG goes up band by band as its rows complete and a
large image in several parts while it is encoded; the upload is completed only when the whole
job has succeeded; a failed or cancelled upload or job leaves no object and no open upload, nor
does a persist service that died; endpoints, buckets,
profiles and keys that are not allowed or do not exist are refused at planning, naming the
stage and the param, and the stack still serves after each."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from tilechain import s3server
from tilechain.client import chain_request
from tilechain.services.core.codecs import decode_image, encode_image, read_metadata, write_image
from tilechain.services.core.stage import Cancelled
from tilechain.services.persist import PART_BYTES, MultipartUpload
from tilechain.stack import Stack
from tilechain.v1 import gateway_pb2, stage_pb2

from .conftest import SOURCE_MAX_BYTES, free_port, rpc_error, run_events
from .test_bad_input import assert_still_serving
from .test_persist import STAGING, held_chain, persist_stub, staged_files, streamed_partly


@pytest.fixture(scope="module")
def s3(stack: Stack):
    return s3server.client(stack.addresses["s3"])


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def keys(s3, bucket: str, prefix: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]


def open_uploads(s3, bucket: str, prefix: str) -> list[str]:
    return [u["Key"] for u in s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])]


def upload_chain(params: dict, name: str = "up") -> dict:
    return {"stages": [{"name": "in", "type": "source-image"}, {"name": name, "type": "persist-s3", "params": params}]}


def test_persist_s3_writes_what_boto3_reads_back(gateway, s3) -> None:
    pixels = noise(96, 64, seed=1)
    chain = upload_chain({"bucket": "tilechain", "key": "readback/{job}-{index}.{ext}", "format": "png"})
    events = run_events(gateway, chain_request(chain, [("in", "image", encode_image(pixels, "png"))]))
    status = events[-1].status
    assert status.state == gateway_pb2.JOB_STATE_SUCCEEDED, status.message
    [artifact] = status.artifacts
    assert artifact.uri == f"s3://tilechain/readback/{status.job_id}-0.png" and artifact.path == f"readback/{status.job_id}-0.png"
    data = s3.get_object(Bucket="tilechain", Key=artifact.path)["Body"].read()
    assert len(data) == artifact.size_bytes and hashlib.sha256(data).hexdigest() == artifact.sha256
    assert np.array_equal(decode_image(data), pixels)
    metadata = read_metadata(data)
    assert metadata["job"] == status.job_id and [s["type"] for s in metadata["stages"]] == ["source-image", "persist-s3"]
    # the same pixels and metadata encode to the same bytes: the object is the encoder's output
    assert data == encode_image(pixels, "png", metadata)
    assert s3.head_object(Bucket="tilechain", Key=artifact.path)["ContentType"] == "image/png"


def test_a_large_image_goes_up_in_parts_as_it_is_encoded(gateway, s3) -> None:
    chain = {"stages": [
        {"name": "noise", "type": "source-noise", "params": {"width": 2048, "height": 2048, "seed": 3}},
        {"name": "up", "type": "persist-s3", "params": {"bucket": "tilechain", "key": "large/{job}.{ext}"}},
    ]}
    status = run_events(gateway, chain_request(chain), timeout=120)[-1].status
    assert status.state == gateway_pb2.JOB_STATE_SUCCEEDED, status.message
    [artifact] = status.artifacts
    assert artifact.size_bytes > PART_BYTES  # a random 2048² PNG: about 12.6 MB
    head = s3.head_object(Bucket="tilechain", Key=artifact.path, PartNumber=1)
    assert head["PartsCount"] == -(-artifact.size_bytes // PART_BYTES)  # one part per 8 MiB, sent as they filled
    assert head["ContentLength"] == PART_BYTES
    data = s3.get_object(Bucket="tilechain", Key=artifact.path)["Body"].read()
    assert hashlib.sha256(data).hexdigest() == artifact.sha256


def run_until_uploaded(gateway, key: str):
    """Start a held job whose persist-s3 stage 'save' uploads under key; return (call, job id)
    once 'save' has finished, i.e. sent every part and left its upload open."""
    chain = held_chain("unused.png")
    chain["stages"][1] = {"name": "save", "type": "persist-s3", "params": {"bucket": "tilechain", "key": key}}
    call = gateway.RunChain(chain_request(chain, return_tiles=gateway_pb2.TILE_RETURN_ALL, transport_tile=16))
    for event in call:
        if (event.WhichOneof("kind") == "stage" and event.stage.name == "save"
                and event.stage.kind == gateway_pb2.StageEvent.KIND_FINISHED):
            return call, event.job_id
    raise AssertionError("the job ended before 'save' finished")


def test_an_object_appears_only_when_the_job_succeeds(gateway, s3, output_root: Path) -> None:
    call, job = run_until_uploaded(gateway, "publish/{job}.png")
    key = f"publish/{job}.png"
    assert keys(s3, "tilechain", key) == [] and open_uploads(s3, "tilechain", key) == [key]  # parts sent, no object yet
    staged = staged_files(output_root)
    assert staged and all(p.name.endswith(".s3.json") for p in staged)  # a record of the open upload, no file
    events = list(call)
    assert events[-1].status.state == gateway_pb2.JOB_STATE_SUCCEEDED, events[-1].status.message
    [artifact] = events[-1].status.artifacts
    assert artifact.uri == f"s3://tilechain/{key}" and [e.artifact.path for e in events if e.WhichOneof("kind") == "artifact"] == [key]
    data = s3.get_object(Bucket="tilechain", Key=key)["Body"].read()
    assert hashlib.sha256(data).hexdigest() == artifact.sha256 and decode_image(data).shape == (512, 512, 3)
    assert open_uploads(s3, "tilechain", key) == [] and staged_files(output_root) == []


def test_a_cancelled_job_leaves_no_object(gateway, s3, output_root: Path) -> None:
    call, job = run_until_uploaded(gateway, "cancelled/{job}.png")
    assert open_uploads(s3, "tilechain", "cancelled/") == [f"cancelled/{job}.png"]
    call.cancel()
    status = gateway.CancelJob(gateway_pb2.JobRef(job_id=job), timeout=60)  # returns once the job has ended
    assert status.state == gateway_pb2.JOB_STATE_CANCELLED
    assert keys(s3, "tilechain", "cancelled/") == [] and open_uploads(s3, "tilechain", "cancelled/") == []
    assert staged_files(output_root) == []


def test_an_object_that_appears_meanwhile_fails_the_job_and_is_kept(gateway, s3, output_root: Path) -> None:
    """Someone else writes the key while the job runs: publishing fails with ALREADY_EXISTS
    naming the stage, their object stays, the job's upload is aborted."""
    call, job = run_until_uploaded(gateway, "raced/{job}.png")
    s3.put_object(Bucket="tilechain", Key=f"raced/{job}.png", Body=b"theirs")
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert f"stage 'save' (persist-s3): param 'key': s3://tilechain/raced/{job}.png appeared while the job ran" in info.value.details()
    assert s3.get_object(Bucket="tilechain", Key=f"raced/{job}.png")["Body"].read() == b"theirs"
    assert open_uploads(s3, "tilechain", "raced/") == [] and staged_files(output_root) == []
    assert_still_serving(gateway)


def test_a_starting_persist_service_aborts_the_uploads_a_dead_one_left_open(stack: Stack, s3, tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    upload_id = s3.create_multipart_upload(Bucket="tilechain", Key="orphan/left-open.png")["UploadId"]
    part = s3.upload_part(Bucket="tilechain", Key="orphan/left-open.png", UploadId=upload_id, PartNumber=1, Body=b"part")
    folder = root / STAGING / "dead-job"
    folder.mkdir(parents=True)
    (folder / "0-save-0.s3.json").write_text(json.dumps({
        "attempt": 0, "overwrite": False, "host": socket.gethostname(), "pid": dead.pid, "artifact": {"stage": "save"},
        "upload": {"endpoint_url": "", "profile_name": "", "region": "", "bucket": "tilechain", "key": "orphan/left-open.png",
                   "upload_id": upload_id, "parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
    }))
    assert open_uploads(s3, "tilechain", "orphan/") == ["orphan/left-open.png"]
    service = Stack({"persist": f"127.0.0.1:{free_port()}", "s3": stack.addresses["s3"]}, tmp_path / "logs")
    service.start(components=("persist",), extra_env={"TILECHAIN_OUTPUT_ROOT": str(root)})
    try:
        assert open_uploads(s3, "tilechain", "orphan/") == [] and keys(s3, "tilechain", "orphan/") == []
        assert not folder.exists()
    finally:
        service.stop()
def test_a_png_goes_up_band_by_band_and_is_exactly_its_input(stack: Stack, gateway, s3) -> None:
    """An odd-sized attachment in 128-px transport tiles: source-image passes it on a
    processing tile (512 px) at a time, persist-s3 encodes and uploads each row of tiles as it
    completes, holding at most the rows of one such processing tile, not the canvas."""
    width, height, edge = 600, 1100, 128
    pixels = noise(width, height, seed=9)
    chain = upload_chain({"bucket": "tilechain", "key": "bands/{job}.png"})
    stub = persist_stub(stack)
    stub.Stats(stage_pb2.StatsRequest(wait_idle=True, reset_peaks=True), timeout=60)
    request = chain_request(chain, [("in", "image", encode_image(pixels, "png"))], transport_tile=edge)
    status = run_events(gateway, request, timeout=120)[-1].status
    assert status.state == gateway_pb2.JOB_STATE_SUCCEEDED, status.message
    stats = stub.Stats(stage_pb2.StatsRequest(wait_idle=True), timeout=60)
    [artifact] = status.artifacts
    data = s3.get_object(Bucket="tilechain", Key=artifact.path)["Body"].read()
    assert len(data) == artifact.size_bytes and hashlib.sha256(data).hexdigest() == artifact.sha256
    assert np.array_equal(decode_image(data), pixels)
    assert read_metadata(data)["job"] == status.job_id
    assert 0 < stats.peak_output_bytes <= 512 * width * 3 < pixels.nbytes / 2


def test_a_png_upload_half_done_when_the_stream_fails_is_aborted(stack: Stack, s3) -> None:
    pixels = noise(200, 256, seed=10)
    job = f"half-s3-{os.getpid()}"
    key = f"half/{job}.png"
    call, finish = streamed_partly(persist_stub(stack), job, "persist-s3", {"bucket": "tilechain", "key": key}, pixels, 64, 128, "end")
    assert open_uploads(s3, "tilechain", key) == [key]  # begun with the first band of rows
    finish.set()
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "input ended before" in info.value.details()
    assert open_uploads(s3, "tilechain", key) == [] and keys(s3, "tilechain", key) == []


def test_a_failed_upload_is_aborted(s3) -> None:
    """MultipartUpload against the real server: an error after two parts were sent leaves no
    object and no open upload."""
    with pytest.raises(RuntimeError, match="the encoder broke"):
        with MultipartUpload(s3, "tilechain", "aborted/failed.png", "image/png", part_bytes=5 * 1024 * 1024) as upload:
            upload.write(b"x" * (11 * 1024 * 1024))
            assert len(upload.parts) == 2 and open_uploads(s3, "tilechain", "aborted/") == ["aborted/failed.png"]
            raise RuntimeError("the encoder broke")
    assert keys(s3, "tilechain", "aborted/") == [] and open_uploads(s3, "tilechain", "aborted/") == []


def test_a_cancelled_upload_is_aborted(s3) -> None:
    """The stage's cancel check runs before each part: once the job is cancelled, the next part
    is not sent and the upload is aborted."""
    cancelled = threading.Event()

    def check() -> None:
        if cancelled.is_set():
            raise Cancelled()

    pixels = noise(1500, 1500, seed=4)  # a 6.8 MB PNG: two parts of 5 MiB
    with pytest.raises(Cancelled):
        with MultipartUpload(s3, "tilechain", "aborted/cancelled.png", "image/png", check, part_bytes=5 * 1024 * 1024) as upload:

            class CancelAfterFirstPart(io.RawIOBase):
                def writable(self) -> bool:
                    return True

                def write(self, data) -> int:
                    if upload.parts:
                        cancelled.set()  # the caller goes away once the first part is up
                    return upload.write(data)

            write_image(CancelAfterFirstPart(), pixels, "png")
            upload.complete()
    assert cancelled.is_set() and len(upload.parts) == 1
    assert keys(s3, "tilechain", "aborted/") == [] and open_uploads(s3, "tilechain", "aborted/") == []


@pytest.mark.parametrize(
    ("params", "code", "words"),
    [
        ({"bucket": "tilechain", "endpoint_url": "http://elsewhere.example:9000"}, grpc.StatusCode.INVALID_ARGUMENT,
         ["stage 'up' (persist-s3): param 'endpoint_url'", "'http://elsewhere.example:9000' is not an S3 endpoint this service may use", "TILECHAIN_S3_ENDPOINTS"]),
        ({"bucket": "no-such-bucket"}, grpc.StatusCode.INVALID_ARGUMENT,
         ["stage 'up' (persist-s3): param 'bucket'", "there is no bucket 'no-such-bucket'"]),
        ({"bucket": "tilechain", "profile_name": "nobody"}, grpc.StatusCode.INVALID_ARGUMENT,
         ["stage 'up' (persist-s3): param 'profile_name'", "'nobody' is not a profile"]),
        ({"bucket": "tilechain", "key": "../{job}.png"}, grpc.StatusCode.INVALID_ARGUMENT,
         ["stage 'up' (persist-s3): param 'key'", "relative path inside the bucket"]),
        ({"bucket": "tilechain", "key": "{job}-{nope}.png"}, grpc.StatusCode.INVALID_ARGUMENT,
         ["stage 'up' (persist-s3): param 'key'", "unknown field {nope}"]),
    ],
    ids=["denied endpoint", "unknown bucket", "unknown profile", "key outside", "unknown field"],
)
def test_persist_s3_refusals(params: dict, code: grpc.StatusCode, words: list[str], gateway, s3) -> None:
    chain = {"stages": [{"name": "noise", "type": "source-noise", "params": {"width": 32, "height": 32, "seed": 1}}, {"name": "up", "type": "persist-s3", "params": params}]}
    before = keys(s3, "tilechain", "")
    error = rpc_error(gateway, chain_request(chain))
    assert error.code() == code
    for word in words:
        assert word in error.details()
    assert keys(s3, "tilechain", "") == before  # refused at planning: nothing written
    assert "no-such-bucket" not in {b["Name"] for b in s3.list_buckets()["Buckets"]}
    assert_still_serving(gateway)


def test_onnx_webs_endpoint_is_allowed_by_the_setting_and_an_existing_key_is_kept(gateway, s3) -> None:
    """The tests' service allows the example pipelines' endpoint (TILECHAIN_S3_ENDPOINTS maps
    it onto the local server) with the `ceph` profile; an existing object is not replaced."""
    params = {"bucket": "storage-stable-diffusion", "endpoint_url": "http://scylla.home.holdmyran.ch:8000", "profile_name": "ceph", "key": "kept.png"}
    s3.put_object(Bucket="storage-stable-diffusion", Key="kept.png", Body=b"precious")
    error = rpc_error(gateway, chain_request(upload_chain(params), [("in", "image", encode_image(noise(16, 16), "png"))]))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "stage 'up' (persist-s3): param 'key': s3://storage-stable-diffusion/kept.png exists" in error.details()
    assert s3.get_object(Bucket="storage-stable-diffusion", Key="kept.png")["Body"].read() == b"precious"
    status = run_events(gateway, chain_request(upload_chain(dict(params, overwrite=True)), [("in", "image", encode_image(noise(16, 16), "png"))]))[-1].status
    assert status.state == gateway_pb2.JOB_STATE_SUCCEEDED, status.message
    assert decode_image(s3.get_object(Bucket="storage-stable-diffusion", Key="kept.png")["Body"].read()).shape == (16, 16, 3)


def test_source_s3_reads_objects(gateway, s3, output_root: Path) -> None:
    first, second = noise(40, 24, seed=5), noise(24, 40, seed=6)
    s3.put_object(Bucket="tilechain", Key="inputs/first.png", Body=encode_image(first, "png"), ContentType="image/png")
    s3.put_object(Bucket="tilechain", Key="inputs/second.png", Body=encode_image(second, "png"))
    chain = {"stages": [
        {"name": "read", "type": "source-s3", "params": {"bucket": "tilechain", "key": "inputs/first.png", "keys": ["inputs/second.png"]}},
        {"name": "save", "type": "persist-disk", "params": {"filename": "from-s3/{job}-{index}.png"}},
    ]}
    status = run_events(gateway, chain_request(chain))[-1].status
    assert status.state == gateway_pb2.JOB_STATE_SUCCEEDED, status.message
    written = [np.asarray(Image.open(output_root / a.path)) for a in sorted(status.artifacts, key=lambda a: a.index)]
    assert np.array_equal(written[0], first) and np.array_equal(written[1], second)


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"bucket": "tilechain", "key": "inputs/missing.png"}, ["stage 'read' (source-s3): param 'key'", "there is no object s3://tilechain/inputs/missing.png"]),
        ({"bucket": "no-such-bucket", "key": "a.png"}, ["stage 'read' (source-s3): param 'bucket'", "there is no bucket 'no-such-bucket'"]),
        ({"bucket": "tilechain", "keys": ["inputs/oversized.png"]}, ["param 'keys'", "over the limit of", "TILECHAIN_SOURCE_MAX_BYTES"]),
        ({"bucket": "tilechain", "key": "inputs/not-an-image.txt"}, ["param 'key'", "is text/plain, not an image"]),
        ({"bucket": "tilechain", "key": "a.png", "endpoint_url": "http://169.254.169.254"}, ["param 'endpoint_url'", "not an S3 endpoint this service may use"]),
    ],
    ids=["missing key", "unknown bucket", "oversized object", "not an image", "denied endpoint"],
)
def test_source_s3_refusals(params: dict, words: list[str], gateway, s3) -> None:
    s3.put_object(Bucket="tilechain", Key="inputs/oversized.png", Body=b"\0" * (SOURCE_MAX_BYTES + 1))
    s3.put_object(Bucket="tilechain", Key="inputs/not-an-image.txt", Body=b"hello", ContentType="text/plain")
    chain = {"stages": [{"name": "read", "type": "source-s3", "params": params}]}
    error = rpc_error(gateway, chain_request(chain))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    for word in words:
        assert word in error.details()
    assert_still_serving(gateway)


def test_weed_dying_at_start_is_started_again_with_fresh_ports(tmp_path: Path) -> None:
    """The first weed exits 255 at once (as when one of its internal ports was taken before it
    bound it); the S3 server says so, starts weed again with other ports and serves the buckets.
    Once stopped, no Unix socket of any start is left in /tmp."""
    calls = tmp_path / "calls"
    stand_in = tmp_path / "weed"
    stand_in.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {calls}\n'
        f'[ "$(wc -l < {calls})" -gt 1 ] || exit 255\n'
        f'exec {s3server.binary()} "$@"\n'
    )
    stand_in.chmod(0o755)
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, s3server.BINARY_ENV: str(stand_in)}
    server = subprocess.Popen(
        [sys.executable, "-m", "tilechain.s3server", "--address", address, "--data-dir", str(tmp_path / "data")],
        env=env, stdout=subprocess.PIPE, text=True,
    )
    try:
        said = []
        for line in server.stdout:
            said.append(line)
            if line.startswith("s3: buckets") or line.startswith("s3: could not"):
                break
        assert any("exited with status 255 while starting (start 1 of 3)" in line for line in said), said
        assert said[-1].startswith("s3: buckets"), said
        assert s3server.ready(address, env)
    finally:
        server.terminate()
        server.wait(timeout=30)
    starts = calls.read_text().splitlines()
    assert len(starts) == 2
    ports = [weed_ports(start) for start in starts]
    assert ports[0]["volume"] != ports[1]["volume"]
    sockets = [path for start in ports for path in s3server.unix_sockets(address, start)]
    assert [path for path in sockets if path.exists()] == []


def weed_ports(command_line: str) -> dict[str, int]:
    """{"volume": 12345, "volume.grpc": 23456, ...} from "-volume.port=12345 -volume.port.grpc=23456 ..."."""
    ports = {}
    for arg in command_line.split():
        flag, _, value = arg.partition("=")
        if ".port" in flag and value.isdigit():
            ports[flag.lstrip("-").replace(".port", "")] = int(value)
    return ports
