"""Chains through the gateway and the real service processes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tilechain.client import TileAssembler, chain_request
from tilechain.services.core.codecs import encode_image, read_metadata
from tilechain.services.core.resample import resize
from tilechain.services.source import noise
from tilechain.v1 import gateway_pb2

from .conftest import run_events


def png(pixels: np.ndarray) -> bytes:
    return encode_image(pixels, "png")


def reference_chain(other: np.ndarray) -> np.ndarray:
    """The chain of test_five_stage_chain computed in-process, whole-canvas, with PIL."""
    pixels = resize(noise("uniform", 48, 40, 7), 48 * 4, 40 * 4, "bicubic")
    pixels = pixels[20 : 20 + 96, 10 : 10 + 128].astype(np.float32)
    blended = pixels + (other.astype(np.float32) - pixels) * 0.25
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def test_five_stage_chain_matches_in_process_reference(gateway, output_root: Path) -> None:
    other = np.random.default_rng(1).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    chain = {
        "stages": [
            {"name": "noise", "type": "source-noise", "params": {"width": 48, "height": 40, "seed": 7}},
            {"name": "up", "type": "upscale-simple", "params": {"scale": 4, "method": "bicubic"}},
            {"name": "crop", "type": "reduce-crop", "params": {"left": 10, "top": 20, "width": 128, "height": 96}},
            {"name": "mix", "type": "blend-linear", "params": {"alpha": 0.25}},
            {"name": "save", "type": "persist-disk", "params": {"filename": "e2e/{job}.{ext}"}},
        ]
    }
    # small transport and processing tiles so that every stage really tiles
    request = chain_request(chain, [("mix", "image", png(other))], return_tiles=gateway_pb2.TILE_RETURN_ALL, transport_tile=32)
    events = run_events(gateway, request)

    status = events[-1].status
    assert status.state == gateway_pb2.JOB_STATE_SUCCEEDED
    assert len(status.artifacts) == 1
    path = output_root / status.artifacts[0].path
    written = np.asarray(Image.open(path))
    expected = reference_chain(other)
    assert written.shape == expected.shape
    assert np.array_equal(written, expected)

    # the returned tiles of the last stage reassemble into the same image
    assembler = TileAssembler()
    for event in events:
        if event.WhichOneof("kind") == "tile":
            assembler.add(event.tile)
    assert np.array_equal(assembler.images[("save", 0)], expected)

    # provenance: every stage's params in the PNG's metadata
    metadata = read_metadata(path.read_bytes())
    assert [s["name"] for s in metadata["stages"]] == ["noise", "up", "crop", "mix", "save"]
    assert metadata["stages"][1]["params"] == {"scale": 4, "method": "bicubic"}
    assert metadata["job"] == status.job_id

    kinds = [e.WhichOneof("kind") for e in events]
    assert kinds.count("stage") == 10  # started and finished, five stages
    assert "progress" in kinds


def test_source_image_thumbnail_and_mask(gateway, output_root: Path) -> None:
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (120, 200, 3), dtype=np.uint8)
    over = rng.integers(0, 256, (60, 100, 3), dtype=np.uint8)
    mask = np.zeros((60, 100), dtype=np.uint8)
    mask[:, 50:] = 255
    chain = {
        "stages": [
            {"name": "load", "type": "source-image"},
            {"name": "small", "type": "reduce-thumbnail", "params": {"width": 100, "height": 100, "method": "bilinear"}},
            {"name": "paste", "type": "blend-mask"},
            {"name": "save", "type": "persist-disk", "params": {"filename": "mask/{job}.{ext}"}},
        ]
    }
    request = chain_request(
        chain,
        [("load", "image", png(base)), ("paste", "image", png(over)), ("paste", "mask", png(mask[:, :, None]))],
        transport_tile=48,
    )
    status = run_events(gateway, request)[-1].status
    written = np.asarray(Image.open(output_root / status.artifacts[0].path))
    small = resize(base, 100, 60, "bilinear")
    assert np.array_equal(written[:, :50], small[:, :50])
    assert np.array_equal(written[:, 50:], over[:, 50:])
