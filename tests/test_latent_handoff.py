"""Latent handoff: consecutive diffusion stages on one VAE hand over latents, not pixels, so
the first skips its VAE decode and the second its encode. Counted with the services' VAE
counters (ServiceStats.vae_decodes/_encodes), through the gateway, on the tiny models."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from tilechain.client import TileAssembler, chain_request
from tilechain.services.core.codecs import LATENT_F32
from tilechain.stack import Stack
from tilechain.v1 import gateway_pb2, stage_pb2, stage_pb2_grpc, tiles_pb2

from .conftest import run_events
from .test_cancel import stats
from .test_diffusion import FAST, MODELS, png, txt2img
from .test_upscale_models import smooth_image

FAMILIES = ("source", "blend", "upscale")


def vae_counts(stack: Stack) -> dict[str, tuple[int, int]]:
    """(decodes, encodes) per diffusion family, once every stream has finished."""
    out = {}
    for family in FAMILIES:
        s = stats(stack, family, wait_idle=True)
        out[family] = (s.vae_decodes, s.vae_encodes)
    return out


def run_counting(gateway, stack: Stack, stages: list[dict], attachments=(), decode: bool = False) -> tuple[list, dict, np.ndarray]:
    """Run a chain asking for the last stage's tiles; its events, the VAE calls per family it
    made, and the final image (the first, if several)."""
    before = vae_counts(stack)
    request = chain_request({"stages": stages}, list(attachments), return_tiles=gateway_pb2.TILE_RETURN_FINAL, decode_between_stages=decode)
    events = run_events(gateway, request, 300)
    assert events[-1].status.state == gateway_pb2.JOB_STATE_SUCCEEDED, events[-1].status
    after = vae_counts(stack)
    calls = {f: (after[f][0] - before[f][0], after[f][1] - before[f][1]) for f in FAMILIES}
    images = TileAssembler()
    for event in events:
        if event.WhichOneof("kind") == "tile":
            images.add(event.tile)
    return events, calls, next(iter(images.images.values()))


def output_formats(events: list) -> dict[str, list[int]]:
    """Each stage's output canvas formats, from its started event."""
    return {
        e.stage.name: [c.format for c in e.stage.outputs]
        for e in events
        if e.WhichOneof("kind") == "stage" and e.stage.kind == gateway_pb2.StageEvent.KIND_STARTED
    }


def refine(**params) -> dict:
    return {"name": "refine", "type": "blend-img2img", "params": {"strength": 0.6, **FAST, **params}}


def test_txt2img_hands_latents_to_img2img(gateway, stack: Stack) -> None:
    events, calls, image = run_counting(gateway, stack, [txt2img(), refine()])
    assert output_formats(events) == {"gen": [LATENT_F32], "refine": [tiles_pb2.PIXEL_FORMAT_RGB8]}
    # txt2img decodes nothing, img2img encodes nothing: one decode in all, at the end
    assert calls == {"source": (0, 0), "blend": (1, 0), "upscale": (0, 0)}
    assert image.shape == (64, 64, 3)

    # the same two diffusers calls in one process, latents passed as diffusers documents it
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODELS / "diffusion" / "tiny-sd15", safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    common = dict(prompt=FAST["prompt"], num_inference_steps=FAST["steps"], guidance_scale=7.0)
    latents = pipe(**common, width=64, height=64, generator=torch.Generator("cpu").manual_seed(5), output_type="latent").images
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    direct = img2img(**common, image=latents, strength=0.6, generator=torch.Generator("cpu").manual_seed(5), output_type="np").images[0]
    assert np.abs(image.astype(int) - np.rint(direct * 255).astype(int)).max() <= 1

    # asked to decode between stages: a decode in txt2img and an encode in img2img come back
    events, calls, pixels_image = run_counting(gateway, stack, [txt2img(), refine()], decode=True)
    assert output_formats(events)["gen"] == [tiles_pb2.PIXEL_FORMAT_RGB8]
    assert calls == {"source": (1, 0), "blend": (1, 1), "upscale": (0, 0)}
    assert not np.array_equal(image, pixels_image)  # the 8-bit round trip changes the result


def test_count_images_each_hand_over_latents(gateway, stack: Stack) -> None:
    _, calls, _ = run_counting(gateway, stack, [txt2img(count=2), refine()])
    assert calls["source"] == (0, 0)
    assert calls["blend"] == (2, 0)


def test_sdxl_hands_latents_to_its_refiner(gateway, stack: Stack) -> None:
    """The diffusers base + refiner pattern: one VAE, so latents."""
    events, calls, _ = run_counting(gateway, stack, [txt2img(model="sdxl"), refine(model="sdxl-refiner")])
    assert output_formats(events)["gen"] == [LATENT_F32]
    assert calls == {"source": (0, 0), "blend": (1, 0), "upscale": (0, 0)}


def test_different_vaes_hand_over_pixels(gateway, stack: Stack) -> None:
    """SD 1.5's latents mean nothing to SDXL's VAE: the chain decodes and re-encodes, as it
    must for any pipeline with another VAE (Kandinsky's MoVQ, ...)."""
    events, calls, _ = run_counting(gateway, stack, [txt2img(), refine(model="sdxl-refiner")])
    assert output_formats(events)["gen"] == [tiles_pb2.PIXEL_FORMAT_RGB8]
    assert calls == {"source": (1, 0), "blend": (1, 1), "upscale": (0, 0)}


def test_img2img_hands_latents_to_the_latent_upscaler(gateway, stack: Stack) -> None:
    """img2img -> latent x2 -> x4: latents into the x2 upscaler (same VAE), pixels into the x4
    (its own VAE, and it conditions on pixels)."""
    stages = [
        {"name": "in", "type": "source-image"},
        refine(strength=0.5),
        {"name": "x2", "type": "upscale-latent", "params": {**FAST, "steps": 1}},
        {"name": "x4", "type": "upscale-stable-diffusion", "params": {**FAST, "steps": 1}},
    ]
    attachments = [("in", "image", png(smooth_image(64, 64, seed=2)))]
    events, calls, image = run_counting(gateway, stack, stages, attachments)
    formats = output_formats(events)
    assert formats["refine"] == [LATENT_F32] and formats["x2"] == [tiles_pb2.PIXEL_FORMAT_RGB8]
    assert calls["blend"] == (0, 1)          # encodes the attached image, hands over latents
    assert calls["upscale"] == (2, 0)        # x2 decodes for the x4, which decodes its own
    assert image.shape == (512, 512, 3)
    _, pixel_calls, _ = run_counting(gateway, stack, stages, attachments, decode=True)
    assert pixel_calls["blend"] == (1, 1) and pixel_calls["upscale"] == (2, 1)


def test_tiled_stages_hand_over_pixels(gateway, stack: Stack) -> None:
    """Processing tiles blend in pixels: a stage that tiles takes and gives pixels."""
    events, calls, _ = run_counting(gateway, stack, [txt2img(width=128), refine(tile=64, overlap=16)])
    assert output_formats(events)["gen"] == [tiles_pb2.PIXEL_FORMAT_RGB8]
    assert calls["source"] == (1, 0)


# --- latents where a stage does not take them -------------------------------------------------


def latent_canvas(space: str, size: int = 8) -> tiles_pb2.Canvas:
    return tiles_pb2.Canvas(
        id=0, width=size, height=size, format=LATENT_F32, role=tiles_pb2.CANVAS_ROLE_IMAGE,
        latent=tiles_pb2.Latent(space=space, channels=4, scale=8),
    )


@pytest.mark.parametrize("family, stage_type, params, fragment", [
    ("upscale", "upscale-simple", {}, "takes pixels, not latents"),
    ("blend", "blend-img2img", {"steps": 2}, "takes latents of 'vae:"),  # another VAE's latents
])
def test_latents_a_stage_cannot_take_are_refused(stack: Stack, family: str, stage_type: str, params: dict, fragment: str) -> None:
    from tilechain.services.core.params import dict_to_struct

    stub = stage_pb2_grpc.StageStub(grpc.insecure_channel(stack.addresses[family]))
    start = stage_pb2.StageStart(job_id="t", name="s", type=stage_type, params=dict_to_struct(params), inputs=[latent_canvas("vae:elsewhere")])
    with pytest.raises(grpc.RpcError) as caught:
        stub.Plan(start, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"stage 's' ({stage_type})" in caught.value.details() and fragment in caught.value.details()


def test_latent_output_where_the_stage_cannot_is_refused(stack: Stack) -> None:
    from tilechain.services.core.params import dict_to_struct

    stub = stage_pb2_grpc.StageStub(grpc.insecure_channel(stack.addresses["source"]))
    start = stage_pb2.StageStart(job_id="t", name="s", type="source-noise", params=dict_to_struct({"width": 64, "height": 64}), latent_output=True)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Plan(start, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot emit latents" in caught.value.details()
