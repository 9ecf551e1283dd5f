"""Large attachments upload in chunks (SubmitChainStream): the job sees the same image, a bad
upload is refused by name, a bad file is refused from its first chunk before the rest is sent,
the CLI streams files over 4 MiB, and a finished job keeps nothing of its attachments."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from tilechain.client import STREAM_ABOVE_BYTES, chain_request, submit_stream, upload_messages
from tilechain.services.core.codecs import encode_image
from tilechain.stack import Stack, process_memory
from tilechain.v1 import gateway_pb2

from .conftest import run_events
from .test_images import bomb_png

COPY = {"stages": [{"name": "load", "type": "source-image"},
                   {"name": "save", "type": "persist-disk", "params": {"filename": "upload/{job}.png"}}]}


def random_png(side: int, seed: int = 0) -> tuple[np.ndarray, bytes]:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return pixels, encode_image(pixels, "png")


def test_streamed_attachment_reaches_the_stage_intact(gateway, output_root: Path) -> None:
    pixels, data = random_png(2048)
    assert len(data) > 8 * 1024 * 1024  # more than a default gRPC message
    ref = submit_stream(gateway, COPY, [("load", "image", data)], timeout=120)
    status = list(gateway.WatchJob(ref, timeout=120))[-1].status
    assert status.state == gateway_pb2.JOB_STATE_SUCCEEDED, status.message
    assert np.array_equal(np.asarray(Image.open(output_root / status.artifacts[0].path)), pixels)


def upload_error(gateway, messages) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        gateway.SubmitChainStream(iter(messages), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    return info.value


def test_malformed_uploads_are_refused_by_name(gateway) -> None:
    _, data = random_png(64)
    good = list(upload_messages(COPY, [("load", "image", data)], chunk_bytes=1000))
    request, chunks, end = good[0], good[1:-1], good[-1]
    assert len(chunks) > 3

    assert "first message must be the request" in upload_error(gateway, [chunks[0]]).details()
    assert "chunk at offset 2000, expected 1000" in upload_error(gateway, [request, chunks[0], chunks[2]]).details()
    assert "chunk at offset 1000, expected 0" in upload_error(gateway, [request, *chunks[1:], end]).details()
    assert "ended without its end message" in upload_error(gateway, [request, *chunks]).details()
    arrived = len(data) - len(chunks[-1].chunk.data)
    assert (f"stage 'load' (source-image): attached image: {arrived} bytes arrived of the {len(data)} declared"
            in upload_error(gateway, [request, *chunks[:-1], end]).details())
    stray = gateway_pb2.ChainUpload(chunk=gateway_pb2.AttachmentChunk(stage="nowhere", data=b"x"))
    assert "did not declare" in upload_error(gateway, [request, stray]).details()
    inline = gateway_pb2.ChainUpload(request=chain_request(COPY, [("load", "image", data)]))
    assert "its bytes come as chunks" in upload_error(gateway, [inline, end]).details()
    bad_chain = list(upload_messages({"stages": [{"name": "load", "type": "source-image", "params": {"x": 1}}]}, [("load", "image", data)]))
    assert "stage 'load' (source-image): param 'x': unknown param" in upload_error(gateway, bad_chain).details()


def test_a_bad_file_is_refused_from_its_first_chunk(gateway) -> None:
    """The header of a 7.8 KB PNG claiming 8000x8000, declared as 64 MiB: the gateway refuses
    on the first chunk, and the client stops sending long before the end."""
    bomb = bomb_png(8000)
    declared = 64 * 1024 * 1024
    pulled = []

    def messages():
        request = chain_request({"stages": [{"name": "load", "type": "source-image"}]})
        request.attachments.add(stage="load", role="image", size=declared)
        yield gateway_pb2.ChainUpload(request=request)
        chunk = bomb + bytes(65536 - len(bomb))
        for offset in range(0, declared, 65536):
            pulled.append(offset)
            yield gateway_pb2.ChainUpload(chunk=gateway_pb2.AttachmentChunk(stage="load", offset=offset, data=chunk))
            chunk = bytes(65536)
        yield gateway_pb2.ChainUpload(end=gateway_pb2.UploadEnd())

    error = upload_error(gateway, messages())
    assert "stage 'load' (source-image): attached image is 8000x8000" in error.details()
    assert len(pulled) * 65536 < declared // 2


def test_cli_streams_large_files(stack: Stack, output_root: Path, tmp_path: Path) -> None:
    pixels, data = random_png(1400, seed=4)
    assert len(data) > STREAM_ABOVE_BYTES
    image = tmp_path / "big.png"
    image.write_bytes(data)
    chain = tmp_path / "chain.json"
    chain.write_text('{"stages": [{"name": "load", "type": "source-image"},'
                     ' {"name": "save", "type": "persist-disk", "params": {"filename": "cli-stream/{job}.png"}}]}')
    result = subprocess.run([sys.executable, "-m", "tilechain.cli", "run", str(chain), "--input", f"load={image}"],
                            capture_output=True, text=True, env=stack.env(), timeout=120)
    assert result.returncode == 0, result.stderr
    wrote = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("wrote ")]
    assert np.array_equal(np.asarray(Image.open(wrote[0])), pixels)
    assert f"1 attachment(s), {len(data)} bytes in" in (stack.log_dir / "gateway.log").read_text()


def test_finished_jobs_keep_nothing_of_their_attachments(gateway, stack: Stack) -> None:
    """Each job decodes a 1024² attachment; once the jobs have ended the gateway holds none of
    them (it used to keep every decoded attachment in its job table)."""
    pid = stack.processes["gateway"].pid
    chain = {"stages": [{"name": "load", "type": "source-image"},
                        {"name": "small", "type": "reduce-thumbnail", "params": {"width": 32, "height": 32}}]}
    requests = [chain_request(chain, [("load", "image", random_png(1024, seed)[1])]) for seed in range(19)]
    for request in requests[:3]:  # warm up: the allocator and the job store's pages settle
        assert run_events(gateway, request)[-1].status.state == gateway_pb2.JOB_STATE_SUCCEEDED
    before = process_memory(pid)
    for request in requests[3:]:
        assert run_events(gateway, request)[-1].status.state == gateway_pb2.JOB_STATE_SUCCEEDED
    after = process_memory(pid)
    # Growth only: the allocator may hand pages back after the warm-up (CI saw -80 MiB), which is fine.
    assert after["VmRSS"] - before["VmRSS"] <= 20 * 1024, (before, after)  # 16 x 3 MiB would show
