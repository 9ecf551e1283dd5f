"""Streaming over real gRPC: a local stage sends output tiles while its input is still arriving,
and the gateway passes them on without waiting for whole images."""

from __future__ import annotations

import threading

import grpc
import numpy as np

from tilechain.client import chain_request
from tilechain.services.core.codecs import tile_message
from tilechain.services.core.tiles import transport_grid
from tilechain.stack import Stack
from tilechain.v1 import gateway_pb2, stage_pb2, stage_pb2_grpc, tiles_pb2


def test_upscale_service_streams_output_before_input_ends(stack: Stack) -> None:
    stub = stage_pb2_grpc.StageStub(grpc.insecure_channel(stack.addresses["upscale"]))
    pixels = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    rects = transport_grid(512, 512, 64)  # 64 input tiles, row-major
    canvas = tiles_pb2.Canvas(id=0, width=512, height=512, format=tiles_pb2.PIXEL_FORMAT_RGB8, role=tiles_pb2.CANVAS_ROLE_IMAGE)
    start = stage_pb2.StageStart(name="up", type="upscale-simple", inputs=[canvas], transport_tile=64)
    start.params.update({"scale": 2, "method": "nearest"})
    log: list[str] = []
    output_seen = threading.Event()

    def requests():
        yield stage_pb2.StageInput(start=start)
        for i, rect in enumerate(rects):
            if i == 48:  # three quarters in: hold back until output has come out (or give up)
                output_seen.wait(timeout=20)
            log.append(f"in {i}")
            yield stage_pb2.StageInput(tile=tile_message(0, rect, pixels))
        yield stage_pb2.StageInput(end=stage_pb2.InputEnd())

    out = np.zeros((1024, 1024, 3), dtype=np.uint8)
    for message in stub.Process(requests(), timeout=60):
        if message.WhichOneof("kind") == "tile":
            t = message.tile
            log.append("out")
            output_seen.set()
            out[t.y : t.y + t.height, t.x : t.x + t.width] = np.frombuffer(t.pixels, np.uint8).reshape(t.height, t.width, 3)
    assert log.index("out") < log.index(f"in {len(rects) - 1}")
    assert np.array_equal(out, pixels.repeat(2, axis=0).repeat(2, axis=1))


def test_final_tiles_reach_the_client_before_the_job_ends(gateway) -> None:
    chain = {"stages": [
        {"name": "load", "type": "source-image"},
        {"name": "up", "type": "upscale-simple", "params": {"scale": 2, "method": "nearest"}},
    ]}
    from tilechain.services.core.codecs import encode_image

    image = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    request = chain_request(chain, [("load", "image", encode_image(image, "png"))],
                            return_tiles=gateway_pb2.TILE_RETURN_FINAL, transport_tile=64)
    events = list(gateway.RunChain(request, timeout=60))
    kinds = [e.WhichOneof("kind") for e in events]
    tiles = [e.tile for e in events if e.WhichOneof("kind") == "tile"]
    assert {t.name for t in tiles} == {"up"}  # FINAL: only the last stage's tiles
    # cut on the grid the canvas announces: the rows shifted so that each x2 output row needs
    # only input rows already received (docs/design.md, "Engine memory")
    grid = tiles[0].canvas.grid
    assert grid.edge == 64 and grid.row_shift > 0
    rects = [(t.tile.x, t.tile.y, t.tile.width, t.tile.height) for t in tiles]
    assert sorted(rects) == sorted((r.x, r.y, r.width, r.height) for r in transport_grid(512, 512, 64, grid.row_shift))
    finished = [i for i, e in enumerate(events) if e.WhichOneof("kind") == "stage" and e.stage.name == "up"
                and e.stage.kind == gateway_pb2.StageEvent.KIND_FINISHED]
    assert kinds.index("tile") < finished[0] < kinds.index("status")
