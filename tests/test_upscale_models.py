"""Super-resolution stages on spandrel, with the random-weight models `make models` builds."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest
import spandrel
import torch

from tilechain.client import chain_request
from tilechain.services.core.codecs import encode_image
from tilechain.services.core.config import Settings
from tilechain.services.core.models import ModelRegistry
from tilechain.services.core.stage import Context, load_all
from tilechain.services.core.tiles import transport_grid
from tilechain.services.core.torch_runtime import to_pixels, to_tensor
from tilechain.v1 import gateway_pb2

from .conftest import ROOT, rpc_error, run_events
from .engine_harness import canvas, run_stage

MODELS = ROOT / "var" / "models"
SETTINGS = Settings(models_root=MODELS, models_config=ROOT / "models.yaml")
REGISTRY = ModelRegistry(SETTINGS.models_config, SETTINGS.models_root)


def smooth_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Photo-like content: random colours at low resolution, bicubically enlarged."""
    from tilechain.services.core.resample import resize

    coarse = np.random.default_rng(seed).integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return resize(coarse, width, height, "bicubic")


def stage(stage_type: str, params: dict):
    return load_all()[stage_type].create("up", params, Context("job", SETTINGS, REGISTRY))


def direct(model_file: str, pixels: np.ndarray) -> np.ndarray:
    """One spandrel call over the whole image, in this process."""
    model = spandrel.ModelLoader().load_from_file(MODELS / "upscalers" / model_file).eval()
    return to_pixels(model(to_tensor(pixels, torch.float32, torch.device("cpu"))))


def test_tiled_esrgan_equals_untiled_within_2_of_255() -> None:
    image = smooth_image(96, 80)
    tiled = run_stage(stage("upscale-resrgan", {"tile": 32, "overlap": 16}), [canvas(96, 80)], {0: image},
                      {0: transport_grid(96, 80, 32)}, transport_tile=64)[0][0]
    whole = direct("esrgan-x4.safetensors", image)
    assert tiled.shape == whole.shape == (320, 384, 3)
    close = np.abs(tiled.astype(int) - whole) <= 2
    assert close.mean() >= 0.999


def test_upscale_streams_output_before_the_input_ends() -> None:
    rects = transport_grid(128, 128, 32)

    async def gate(i: int, output_seen: asyncio.Event) -> None:
        if i == 12:  # three of four rows in: the top tiles' output must be out by now
            try:
                await asyncio.wait_for(output_seen.wait(), timeout=30)
            except asyncio.TimeoutError:
                pass

    _, log = run_stage(stage("upscale-resrgan", {"model": "compact-x4", "tile": 32, "overlap": 8}), [canvas(128, 128)],
                       {0: smooth_image(128, 128)}, {0: rects}, transport_tile=64, gate=gate)
    assert log.index(("out", 0)) < log.index(("in", len(rects) - 1))


def test_out_of_memory_halves_the_tile_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU runs out of memory here, so the model raises torch's OutOfMemoryError for inputs
    over 100 px, as CUDA would; the stage must halve its tile (128 px plus 8 px of context on
    each side, clamped to the 128 px canvas) and finish with the same image."""
    image = smooth_image(128, 128)
    upscaler = stage("upscale-resrgan", {"model": "compact-x4", "tile": 128, "overlap": 8})
    forward = type(upscaler)._forward

    def limited(self, pixels: np.ndarray) -> np.ndarray:
        if max(pixels.shape[:2]) > 100:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, pixels)

    monkeypatch.setattr(type(upscaler), "_forward", limited)
    out = run_stage(upscaler, [canvas(128, 128)], {0: image}, {0: transport_grid(128, 128, 32)})[0][0]
    assert upscaler.oom_tile == 64
    assert upscaler.context.notices == ["out of memory: tile halved to 64 px and retried"]
    monkeypatch.undo()
    reference = run_stage(stage("upscale-resrgan", {"model": "compact-x4", "tile": 128, "overlap": 8}), [canvas(128, 128)],
                          {0: image}, {0: transport_grid(128, 128, 32)})[0][0]
    assert (np.abs(out.astype(int) - reference) <= 2).mean() >= 0.999


@pytest.mark.parametrize(
    "stage_type, model, scale",
    [
        ("upscale-resrgan", "esrgan-x4", 4),
        ("upscale-resrgan", "compact-x4", 4),
        ("upscale-bsrgan", "esrgan-x2", 2),
        ("upscale-swinir", "swinir-x2", 2),
        ("upscale-spandrel", "upscalers/compact-x4.safetensors", 4),
    ],
)
def test_model_upscale_through_the_gateway(gateway, output_root: Path, stage_type: str, model: str, scale: int) -> None:
    image = smooth_image(48, 40, seed=scale)
    chain = {"stages": [
        {"name": "load", "type": "source-image"},
        {"name": "up", "type": stage_type, "params": {"model": model, "tile": 32, "overlap": 8}},
        {"name": "save", "type": "persist-disk", "params": {"filename": "models/{job}.png"}},
    ]}
    events = run_events(gateway, chain_request(chain, [("load", "image", encode_image(image, "png"))], transport_tile=32), timeout=120)
    status = events[-1].status
    assert status.state == gateway_pb2.JOB_STATE_SUCCEEDED
    from PIL import Image

    written = np.asarray(Image.open(output_root / status.artifacts[0].path))
    assert written.shape == (40 * scale, 48 * scale, 3)
    model_file = Path(model).name if "/" in model else f"{model}.safetensors"
    whole = direct(model_file, image)
    assert (np.abs(written.astype(int) - whole) <= 2).mean() >= 0.99


def test_outscale_resizes_the_model_output(gateway) -> None:
    chain = {"stages": [
        {"name": "noise", "type": "source-noise", "params": {"width": 40, "height": 32, "seed": 1}},
        {"name": "up", "type": "upscale-resrgan", "params": {"model": "compact-x4", "outscale": 2.5}},
    ]}
    events = run_events(gateway, chain_request(chain, return_tiles=gateway_pb2.TILE_RETURN_FINAL), timeout=120)
    tiles = [e.tile for e in events if e.WhichOneof("kind") == "tile"]
    assert (tiles[0].canvas.width, tiles[0].canvas.height) == (100, 80)


@pytest.fixture
def junk_model() -> str:
    path = MODELS / "upscalers" / "not-a-model.pth"
    path.write_bytes(b"this is not a model")
    yield "upscalers/not-a-model.pth"
    path.unlink()


BAD = {
    "unknown model": ({"model": "esrgan-x16"}, "upscale-resrgan", ["param 'model'", "unknown model 'esrgan-x16'", "esrgan-x4"]),
    "outside the models root": ({"model": "../../etc/passwd"}, "upscale-spandrel", ["param 'model'", "outside the models root"]),
    "face model in upscale": ({"model": "faces/gfpgan.safetensors"}, "upscale-spandrel", ["param 'model'", "FaceSR", "takes SR or Restoration"]),
    "wrong architecture": ({"model": "esrgan-x2"}, "upscale-swinir", ["param 'model'", "is a ESRGAN model", "takes SwinIR"]),
    "tile below the model's minimum": ({"model": "swinir-x2", "tile": 8}, "upscale-swinir", ["param 'tile'", "smaller than the model's minimum of 16"]),
    "tile neither a size nor auto": ({"tile": "big"}, "upscale-resrgan", ["param 'tile'", "expected an integer or 'auto'"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_model_params(gateway, case: str) -> None:
    params, stage_type, fragments = BAD[case]
    chain = {"stages": [{"name": "noise", "type": "source-noise", "params": {"width": 32, "height": 32}},
                        {"name": "up", "type": stage_type, "params": params}]}
    error = rpc_error(gateway, chain_request(chain))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"stage 'up' ({stage_type})" in error.details()
    for fragment in fragments:
        assert fragment in error.details()


def test_file_that_is_no_model(gateway, junk_model: str) -> None:
    chain = {"stages": [{"name": "noise", "type": "source-noise", "params": {"width": 32, "height": 32}},
                        {"name": "up", "type": "upscale-spandrel", "params": {"model": junk_model}}]}
    error = rpc_error(gateway, chain_request(chain))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "param 'model'" in error.details() and "not a model spandrel can load" in error.details()


def test_model_output_over_the_size_limit(gateway) -> None:
    chain = {"stages": [{"name": "noise", "type": "source-noise", "params": {"width": 1024, "height": 1024}},
                        {"name": "up", "type": "upscale-resrgan", "params": {"model": "compact-x4"}}]}
    error = rpc_error(gateway, chain_request(chain))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stage 'up' (upscale-resrgan): param 'outscale': output canvas 4096x4096 is outside the limit" in error.details()
