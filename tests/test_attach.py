"""Images attached to any stage: a stage that takes no attachment in that role gets the image
as one of its inputs (after the previous stage's), so a chain may start with any stage that
transforms images; onnx-web's `source:<stage>` and `mask:<stage>` names attach too."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
from PIL import Image

from tilechain.client import chain_request
from tilechain.services.core.codecs import encode_image
from tilechain.v1 import gateway_pb2

from .conftest import rpc_error, run_events

PIXELS = np.random.default_rng(21).integers(0, 256, (24, 40, 3), dtype=np.uint8)


def written(status, output_root: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(output_root / a.path)) for a in sorted(status.artifacts, key=lambda a: a.index)]


def test_a_chain_may_start_with_a_stage_that_transforms_an_image(gateway, output_root: Path) -> None:
    chain = {"stages": [
        {"name": "up", "type": "upscale-simple", "params": {"scale": 2, "method": "nearest"}},
        {"name": "save", "type": "persist-disk", "params": {"filename": "attach-first/{job}.png"}},
    ]}
    for target in ("up", "source:up"):  # by name and role, and by onnx-web's name
        status = run_events(gateway, chain_request(chain, [(target, "image" if target == "up" else "", encode_image(PIXELS, "png"))]))[-1].status
        assert status.state == gateway_pb2.JOB_STATE_SUCCEEDED, status.message
        [image] = written(status, output_root)
        assert np.array_equal(image, PIXELS.repeat(2, axis=0).repeat(2, axis=1))


def test_an_attached_image_joins_the_previous_stages_images(gateway, output_root: Path) -> None:
    chain = {"stages": [
        {"name": "noise", "type": "source-noise", "params": {"width": 40, "height": 24, "seed": 2}},
        {"name": "crop", "type": "reduce-crop", "params": {"left": 4, "top": 2, "width": 16, "height": 8}},
        {"name": "save", "type": "persist-disk", "params": {"filename": "attach-join/{job}-{index}.png"}},
    ]}
    status = run_events(gateway, chain_request(chain, [("source:crop", "", encode_image(PIXELS, "png"))]))[-1].status
    assert status.state == gateway_pb2.JOB_STATE_SUCCEEDED, status.message
    noise, attached = written(status, output_root)
    assert noise.shape == attached.shape == (8, 16, 3)
    assert np.array_equal(attached, PIXELS[2:10, 4:20])  # the attached image comes second (index 1)


def test_a_stage_that_takes_the_role_keeps_its_own_meaning(gateway, output_root: Path) -> None:
    """blend-mask's attached image and mask, by onnx-web's names: the image is blended over the
    chain's image through the mask, as before."""
    mask = np.zeros((24, 40, 1), dtype=np.uint8)
    mask[:, 20:] = 255
    chain = {"stages": [
        {"name": "noise", "type": "source-noise", "params": {"width": 40, "height": 24, "seed": 3}},
        {"name": "paste", "type": "blend-mask"},
        {"name": "save", "type": "persist-disk", "params": {"filename": "attach-mask/{job}.png"}},
    ]}
    request = chain_request(chain, [("source:paste", "", encode_image(PIXELS, "png")), ("mask:paste", "", encode_image(mask, "png"))])
    status = run_events(gateway, request)[-1].status
    assert status.state == gateway_pb2.JOB_STATE_SUCCEEDED, status.message
    [image] = written(status, output_root)
    assert np.array_equal(image[:, 20:], PIXELS[:, 20:]) and not np.array_equal(image[:, :20], PIXELS[:, :20])


def test_an_onnx_web_name_with_another_role_is_refused(gateway) -> None:
    chain = {"stages": [{"name": "up", "type": "upscale-simple"}]}
    error = rpc_error(gateway, chain_request(chain, [("mask:up", "image", encode_image(PIXELS, "png"))]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'mask:up' names a mask, but role is 'image'" in error.details()
