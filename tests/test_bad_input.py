"""Bad requests: the right status, a message naming the stage and the param, nothing run or
written, and the servers still serving afterwards."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from tilechain.client import chain_request, connect
from tilechain.services.core.codecs import encode_image
from tilechain.stack import Stack
from tilechain.v1 import gateway_pb2, stage_pb2, stage_pb2_grpc, tiles_pb2

from .conftest import free_port, job_store_url, rpc_error, run_events

NOISE = {"name": "noise", "type": "source-noise", "params": {"width": 64, "height": 64, "seed": 1}}


def chain(*stages: dict) -> dict:
    return {"stages": [NOISE, *stages]}


def png(shape=(32, 32, 3)) -> bytes:
    return encode_image(np.zeros(shape, dtype=np.uint8), "png")


def assert_still_serving(gateway) -> None:
    events = run_events(gateway, chain_request(chain({"name": "up", "type": "upscale-simple"})))
    assert events[-1].status.state == gateway_pb2.JOB_STATE_SUCCEEDED


CASES = {
    "malformed json": (
        '{"stages": [ {"name": "a", }',
        grpc.StatusCode.INVALID_ARGUMENT, ["chain_json", "not valid JSON", "line 1"],
    ),
    "unknown stage key": (
        {"stages": [{"name": "a", "type": "source-noise", "parms": {}}]},
        grpc.StatusCode.INVALID_ARGUMENT, ["stages[0]", "parms"],
    ),
    "unknown top-level key": (
        {"stages": [NOISE], "stagse": []},
        grpc.StatusCode.INVALID_ARGUMENT, ["chain_json", "unknown key(s) ['stagse']", "defaults and platform"],
    ),
    "unknown defaults group": (
        {"stages": [NOISE], "defaults": {"inpaint": {"steps": 2}}},
        grpc.StatusCode.INVALID_ARGUMENT, ["defaults", "unknown group 'inpaint'", "txt2img, img2img"],
    ),
    "duplicate stage name": (
        {"stages": [NOISE, NOISE]},
        grpc.StatusCode.INVALID_ARGUMENT, ["stage 'noise'", "twice"],
    ),
    "unknown stage type": (
        chain({"name": "big", "type": "upscale-enormous"}),
        grpc.StatusCode.INVALID_ARGUMENT, ["stage 'big' (upscale-enormous)", "unknown stage type", "upscale-simple"],
    ),
    "unknown family": (
        chain({"name": "x", "type": "teleport-image"}),
        grpc.StatusCode.INVALID_ARGUMENT, ["stage 'x' (teleport-image)", "unknown stage type"],
    ),
    "unknown param": (
        chain({"name": "up", "type": "upscale-simple", "params": {"scales": 2}}),
        grpc.StatusCode.INVALID_ARGUMENT, ["stage 'up' (upscale-simple)", "param 'scales'", "unknown param", "scale"],
    ),
    "wrong type": (
        chain({"name": "up", "type": "upscale-simple", "params": {"scale": "two"}}),
        grpc.StatusCode.INVALID_ARGUMENT, ["stage 'up' (upscale-simple)", "param 'scale'", "expected an integer"],
    ),
    "fractional int": (
        chain({"name": "up", "type": "upscale-simple", "params": {"scale": 2.5}}),
        grpc.StatusCode.INVALID_ARGUMENT, ["param 'scale'", "expected an integer"],
    ),
    "out of range": (
        chain({"name": "up", "type": "upscale-simple", "params": {"scale": 12}}),
        grpc.StatusCode.INVALID_ARGUMENT, ["stage 'up' (upscale-simple)", "param 'scale'", "above the maximum 8"],
    ),
    "bad choice": (
        chain({"name": "up", "type": "upscale-simple", "params": {"method": "magic"}}),
        grpc.StatusCode.INVALID_ARGUMENT, ["param 'method'", "'magic' is not one of"],
    ),
    "missing required": (
        chain({"name": "cut", "type": "reduce-crop", "params": {"width": 8}}),
        grpc.StatusCode.INVALID_ARGUMENT, ["stage 'cut' (reduce-crop)", "param 'height'", "required"],
    ),
    "canvas over the limit": (
        # the test stack's limit is 2048 x 2048
        chain({"name": "up", "type": "upscale-simple", "params": {"scale": 8}},
              {"name": "up2", "type": "upscale-simple", "params": {"scale": 8}}),
        grpc.StatusCode.INVALID_ARGUMENT, ["stage 'up2' (upscale-simple)", "param 'scale'", "4096x4096", "limit"],
    ),
    "source over the limit": (
        {"stages": [{"name": "n", "type": "source-noise", "params": {"width": 4096, "height": 4096}}]},
        grpc.StatusCode.INVALID_ARGUMENT, ["stage 'n' (source-noise)", "param 'width'", "limit"],
    ),
    "crop past the edge": (
        chain({"name": "cut", "type": "reduce-crop", "params": {"left": 40, "width": 32, "height": 8}}),
        grpc.StatusCode.INVALID_ARGUMENT, ["stage 'cut' (reduce-crop)", "param 'width'", "reaches past"],
    ),
    "missing attachment": (
        chain({"name": "mix", "type": "blend-linear"}),
        grpc.StatusCode.INVALID_ARGUMENT, ["stage 'mix' (blend-linear)", "needs an attached image"],
    ),
    "histogram without an image": (
        {"stages": [{"name": "n", "type": "source-noise", "params": {"method": "histogram"}}]},
        grpc.StatusCode.INVALID_ARGUMENT, ["stage 'n' (source-noise)", "param 'method'", "needs an input image"],
    ),
    "path traversal": (
        chain({"name": "save", "type": "persist-disk", "params": {"filename": "../escape.png"}}),
        grpc.StatusCode.INVALID_ARGUMENT, ["stage 'save' (persist-disk)", "param 'filename'", "inside the output root"],
    ),
    "absolute path": (
        chain({"name": "save", "type": "persist-disk", "params": {"filename": "/tmp/escape.png"}}),
        grpc.StatusCode.INVALID_ARGUMENT, ["param 'filename'", "inside the output root"],
    ),
    "unknown template field": (
        chain({"name": "save", "type": "persist-disk", "params": {"filename": "{user}.png"}}),
        grpc.StatusCode.INVALID_ARGUMENT, ["param 'filename'", "unknown field {user}"],
    ),
    "one file for several images": (
        {"stages": [{"name": "n", "type": "source-noise", "params": {"width": 32, "height": 32, "count": 2}},
                    {"name": "save", "type": "persist-disk", "params": {"filename": "same.png"}}]},
        grpc.StatusCode.INVALID_ARGUMENT, ["param 'filename'", "same file for several images"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_chain_is_refused_with_a_clear_message(gateway, output_root: Path, case: str) -> None:
    body, code, fragments = CASES[case]
    before = sorted(output_root.rglob("*"))
    error = rpc_error(gateway, chain_request(body))
    assert error.code() == code, error.details()
    for fragment in fragments:
        assert fragment in error.details()
    assert sorted(output_root.rglob("*")) == before  # nothing ran, nothing written
    assert_still_serving(gateway)


def test_corrupt_attached_image(gateway) -> None:
    request = chain_request(
        {"stages": [{"name": "load", "type": "source-image"}]}, [("load", "image", b"\x89PNG\r\n\x1a\nnot really")]
    )
    error = rpc_error(gateway, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stage 'load' (source-image): attached image: not a readable image" in error.details()
    assert_still_serving(gateway)


def test_attached_image_over_the_limit(gateway) -> None:
    big = encode_image(np.zeros((2100, 2100, 1), dtype=np.uint8), "png")
    error = rpc_error(gateway, chain_request({"stages": [{"name": "load", "type": "source-image"}]}, [("load", "image", big)]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stage 'load' (source-image): attached image is 2100x2100" in error.details()


def test_two_forms_of_the_chain(gateway) -> None:
    request = chain_request(chain())
    request.stages.add(name="x", type="source-noise")
    error = rpc_error(gateway, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "give one of chain, chain_json or stages, not chain_json and stages" in error.details()


def test_attachment_for_a_missing_stage(gateway) -> None:
    """(An image attached to a stage that takes none joins its inputs: tests/test_attach.py.)"""
    error = rpc_error(gateway, chain_request(chain(), [("nowhere", "image", png())]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no stage named 'nowhere'" in error.details()
    error = rpc_error(gateway, chain_request(chain(), [("source:nowhere", "", png())]))
    assert "no stage named 'nowhere'" in error.details()


def test_mask_size_mismatch(gateway) -> None:
    request = chain_request(
        chain({"name": "paste", "type": "blend-mask"}),
        [("paste", "image", png((64, 64, 3))), ("paste", "mask", png((32, 32, 1)))],
    )
    error = rpc_error(gateway, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stage 'paste' (blend-mask): param 'mask': the mask is 32x32 but the image is 64x64" in error.details()


def test_existing_file_is_never_overwritten(gateway, output_root: Path) -> None:
    target = output_root / "keep" / "mine.png"
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(b"precious")
    error = rpc_error(gateway, chain_request(chain({"name": "save", "type": "persist-disk", "params": {"filename": "keep/mine.png"}})))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "stage 'save' (persist-disk): param 'filename'" in error.details()
    assert target.read_bytes() == b"precious"
    assert [p.name for p in target.parent.iterdir()] == ["mine.png"]  # no temp file left


def test_failed_stage_mid_chain_leaves_no_file(gateway, output_root: Path) -> None:
    """A bad stage after a persist stage is caught by planning: the persist never runs."""
    request = chain_request(chain(
        {"name": "save", "type": "persist-disk", "params": {"filename": "midchain/{job}.png"}},
        {"name": "cut", "type": "reduce-crop", "params": {"left": 100, "width": 8, "height": 8}},
    ))
    error = rpc_error(gateway, request)
    assert "stage 'cut' (reduce-crop): param 'left'" in error.details()
    assert not (output_root / "midchain").exists()


def test_family_that_is_down_is_unavailable_by_name(stack: Stack, tmp_path: Path) -> None:
    """A second gateway whose upscale service address has nothing listening."""
    addresses = dict(stack.addresses, gateway=f"127.0.0.1:{free_port()}", upscale=f"127.0.0.1:{free_port()}")
    lonely = Stack(addresses, tmp_path)
    lonely.start(components=("gateway",), extra_env={"TILECHAIN_JOB_STORE": job_store_url(tmp_path)})
    try:
        error = rpc_error(connect(addresses["gateway"]), chain_request(chain({"name": "up", "type": "upscale-simple"})))
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "the upscale service at " + addresses["upscale"] in error.details()
        # chains that do not need it still run
        events = run_events(connect(addresses["gateway"]), chain_request(chain()))
        assert events[-1].status.state == gateway_pb2.JOB_STATE_SUCCEEDED
    finally:
        lonely.stop()


def stage_stub(stack: Stack, family: str) -> stage_pb2_grpc.StageStub:
    return stage_pb2_grpc.StageStub(grpc.insecure_channel(stack.addresses[family]))


def test_stage_service_rejects_bad_streams(stack: Stack) -> None:
    stub = stage_stub(stack, "reduce")
    # no start message
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Process(iter([stage_pb2.StageInput(end=stage_pb2.InputEnd())])))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must begin with a start message" in info.value.details()

    canvas = tiles_pb2.Canvas(id=0, width=16, height=16, format=tiles_pb2.PIXEL_FORMAT_RGB8, role=tiles_pb2.CANVAS_ROLE_IMAGE)
    start = stage_pb2.StageStart(name="cut", type="reduce-crop", inputs=[canvas])
    start.params.update({"width": 8, "height": 8})
    # a tile with the wrong number of bytes
    bad_tile = tiles_pb2.Tile(canvas_id=0, x=0, y=0, width=16, height=16, pixels=b"\0" * 10)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Process(iter([stage_pb2.StageInput(start=start), stage_pb2.StageInput(tile=bad_tile)])))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has 10 bytes, expected 768" in info.value.details()
    # a type this family does not serve
    start.type = "upscale-simple"
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Process(iter([stage_pb2.StageInput(start=start)])))
    assert "unknown stage type for the reduce service" in info.value.details()
    # still serving
    catalog = stub.Describe(stage_pb2.DescribeRequest())
    assert {s.type for s in catalog.stages} == {"reduce-crop", "reduce-thumbnail"}


def test_attachment_over_the_default_8_mib_message_limit(gateway, output_root) -> None:
    """The gateway takes requests up to 256 MiB; a 12 MB random-pixel PNG must get through."""
    import numpy as np

    from tilechain.client import chain_request
    from tilechain.services.core.codecs import encode_image
    from tilechain.v1 import gateway_pb2

    pixels = np.random.default_rng(8).integers(0, 256, (2048, 2048, 3), dtype=np.uint8)
    data = encode_image(pixels, "png")
    assert len(data) > 8 * 1024 * 1024
    chain = {"stages": [{"name": "in", "type": "source-image"},
                        {"name": "small", "type": "reduce-thumbnail", "params": {"width": 64, "height": 64}}]}
    events = list(gateway.RunChain(chain_request(chain, [("in", "image", data)]), timeout=120))
    assert events[-1].status.state == gateway_pb2.JOB_STATE_SUCCEEDED
