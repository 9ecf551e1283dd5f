"""SIGTERM drains: a stream in flight when the service is told to stop still completes."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import numpy as np

from tilechain.services.core.codecs import tile_message
from tilechain.services.core.tiles import transport_grid
from tilechain.stack import Stack
from tilechain.v1 import stage_pb2, stage_pb2_grpc, tiles_pb2

from .conftest import free_port


def test_sigterm_drains_the_stream_in_flight(tmp_path: Path) -> None:
    stack = Stack({"reduce": f"127.0.0.1:{free_port()}"}, tmp_path)
    stack.start(components=("reduce",))
    process = stack.processes["reduce"]
    try:
        stub = stage_pb2_grpc.StageStub(grpc.insecure_channel(stack.addresses["reduce"]))
        pixels = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
        canvas = tiles_pb2.Canvas(id=0, width=1024, height=1024, format=tiles_pb2.PIXEL_FORMAT_RGB8, role=tiles_pb2.CANVAS_ROLE_IMAGE)
        start = stage_pb2.StageStart(name="cut", type="reduce-crop", inputs=[canvas], transport_tile=128)
        start.params.update({"left": 0, "top": 0, "width": 1024, "height": 1024})
        rects = transport_grid(1024, 1024, 128)  # 8 x 8; the first 512 px window is in after 32
        first_output = threading.Event()

        def requests():
            yield stage_pb2.StageInput(start=start)
            for i, rect in enumerate(rects):
                if i == 40:
                    first_output.wait(timeout=20)  # the stream is surely open and working
                    process.terminate()            # SIGTERM mid-stream
                yield stage_pb2.StageInput(tile=tile_message(0, rect, pixels))
            yield stage_pb2.StageInput(end=stage_pb2.InputEnd())

        out = np.zeros_like(pixels)
        kinds = []
        for message in stub.Process(requests(), timeout=60):
            kinds.append(message.WhichOneof("kind"))
            if kinds[-1] == "tile":
                first_output.set()
                t = message.tile
                out[t.y : t.y + t.height, t.x : t.x + t.width] = np.frombuffer(t.pixels, np.uint8).reshape(t.height, t.width, 3)
        assert kinds[-1] == "done"
        assert np.array_equal(out, pixels)
        assert process.wait(timeout=30) == 0
        log = (tmp_path / "reduce.log").read_text()
        assert "draining in-flight streams" in log and "stopped" in log
    finally:
        stack.stop()


def test_tune_malloc_sets_the_threshold_or_leaves_glibc_alone(monkeypatch) -> None:
    """Every server process calls tune_malloc first (services/core/server.py): the threshold from
    TILECHAIN_MALLOC_MMAP_THRESHOLD (default 1 GiB), or none with 0."""
    import platform

    from tilechain.services.core.server import DEFAULT_MMAP_THRESHOLD, tune_malloc

    monkeypatch.setenv("TILECHAIN_MALLOC_MMAP_THRESHOLD", "0")
    assert tune_malloc() == 0
    monkeypatch.delenv("TILECHAIN_MALLOC_MMAP_THRESHOLD")
    expected = DEFAULT_MMAP_THRESHOLD if platform.libc_ver()[0] == "glibc" else 0
    assert tune_malloc() == expected
