"""The tilechain command against the running stack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from tilechain.services.core.codecs import encode_image
from tilechain.stack import Stack

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, stack: Stack | None = None) -> subprocess.CompletedProcess:
    env = stack.env() if stack else None
    return subprocess.run([sys.executable, "-m", "tilechain.cli", *args], capture_output=True, text=True, env=env, timeout=120)


def test_run_prints_the_artifact_and_progress(stack: Stack, output_root: Path, tmp_path: Path) -> None:
    image = tmp_path / "in.png"
    image.write_bytes(encode_image(np.full((40, 50, 3), 90, np.uint8), "png"))
    chain = tmp_path / "chain.json"
    chain.write_text('{"stages": [{"name": "load", "type": "source-image"},'
                     ' {"name": "up", "type": "upscale-simple", "params": {"scale": 3}},'
                     ' {"name": "save", "type": "persist-disk", "params": {"filename": "cli/{job}.webp", "format": "webp"}}]}')
    result = cli("run", str(chain), "--input", f"load={image}", stack=stack)
    assert result.returncode == 0, result.stderr
    assert "JOB_STATE_SUCCEEDED" in result.stdout
    wrote = [line for line in result.stdout.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 1 and "150x120 webp" in wrote[0]
    path = Path(wrote[0].split()[1])
    assert path.is_file() and path.is_relative_to(output_root)
    assert "[stage 2] up (upscale-simple) finished" in result.stderr


def test_run_reports_a_bad_chain(stack: Stack, tmp_path: Path) -> None:
    chain = tmp_path / "chain.json"
    chain.write_text('{"stages": [{"name": "n", "type": "source-noise", "params": {"width": 1}}]}')
    result = cli("run", str(chain), stack=stack)
    assert result.returncode == 1
    assert "INVALID_ARGUMENT: stage 'n' (source-noise): param 'width': 1 is below the minimum 8" in result.stderr


def test_stages_lists_the_catalog(stack: Stack) -> None:
    online = cli("stages", stack=stack)
    offline = cli("stages", "--offline")
    assert online.returncode == 0 and "`upscale-simple`" in online.stdout
    assert online.stdout == offline.stdout


def test_the_main_job_upscales_a_real_photo_with_real_weights(gateway) -> None:
    """examples/chains/default.json on its input photo, as `make run` runs it: the x4 is Real-ESRGAN's
    own net (the same pixels as the model alone) and recovers detail a resize cannot; the
    diffusion stages after it (random weights, stand-ins) take their ControlNet's edges from the
    x4 and hand latents from txt2img to img2img."""
    from urllib.parse import urlparse

    from skimage.data import astronaut

    from tilechain.client import chain_request
    from tilechain.services.core.codecs import decode_image
    from tilechain.services.core.resample import resize
    from tilechain.v1 import gateway_pb2, tiles_pb2

    from .test_real_weights import recovered_detail, spandrel_upscale

    photo = ROOT / "var/inputs/astronaut.png"  # written by `make models`; `make run` attaches it
    request = chain_request((ROOT / "examples/chains/default.json").read_text(), [("photo", "image", photo.read_bytes())])
    events = list(gateway.RunChain(request, timeout=300))
    status = events[-1].status
    assert status.state == gateway_pb2.JOB_STATE_SUCCEEDED, status
    assert [(a.stage, a.width, a.height, a.format) for a in status.artifacts] == [("save-x4", 1024, 1024, "png"), ("save-gen", 256, 256, "png")]
    saved = [decode_image(Path(urlparse(a.uri).path).read_bytes()) for a in status.artifacts]
    small = np.array(decode_image(photo.read_bytes()))
    assert (np.abs(saved[0].astype(int) - spandrel_upscale("realesr-animevideov3-x4", small)) <= 2).mean() >= 0.999
    original = astronaut()  # 512 px: the input is it at half size, so compare at 512
    real = recovered_detail(resize(saved[0], 512, 512, "lanczos"), original)
    plain = recovered_detail(resize(resize(small, 1024, 1024, "lanczos"), 512, 512, "lanczos"), original)
    assert real >= 1.3 * plain  # measured: 0.88 against 0.60
    assert saved[1].std() > 5  # the stand-ins draw texture, not a flat image
    started = {e.stage.name: e.stage.outputs[0].format for e in events if e.WhichOneof("kind") == "stage" and e.stage.kind == gateway_pb2.StageEvent.KIND_STARTED}
    assert started["gen"] == tiles_pb2.PIXEL_FORMAT_LATENT_F32  # txt2img hands img2img latents


def test_noise_example_chain(gateway) -> None:
    from tilechain.client import chain_request
    from tilechain.v1 import gateway_pb2

    events = list(gateway.RunChain(chain_request((ROOT / "examples/chains/noise-upscale.json").read_text()), timeout=120))
    status = events[-1].status
    assert status.state == gateway_pb2.JOB_STATE_SUCCEEDED, status
    assert [(a.width, a.height, a.format) for a in status.artifacts] == [(512, 512, "png")]
