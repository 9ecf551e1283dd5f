"""Kandinsky 2.2 through the gateway: models.yaml's `auto` family (diffusers' AutoPipelineFor*
classes) on the tiny random-weight models `make models` builds. Text-to-image is the combined
prior + decoder pipeline, image-to-image comes from the same weights with from_pipe, inpainting
needs its own decoder (kandinsky22-inpaint). MoVQ is not SD's VAE, so the stages hand over
pixels. 64 px, 2 steps: CPU-sized."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from tilechain.client import chain_request
from tilechain.stack import Stack
from tilechain.v1 import tiles_pb2

from .conftest import rpc_error
from .test_diffusion import FAST, MODELS, image_of, png, run_chain, square_mask, txt2img
from .test_latent_handoff import output_formats, run_counting
from .test_upscale_models import smooth_image

RGB8 = tiles_pb2.PIXEL_FORMAT_RGB8


def kandinsky_txt2img(**params) -> dict:
    return txt2img(model="kandinsky22", **params)


def kandinsky_refine(**params) -> dict:
    return {"name": "refine", "type": "blend-img2img", "params": {"model": "kandinsky22", "strength": 0.6, **FAST, **params}}


@pytest.fixture(scope="module")
def pipe():
    """The same model in this process, as the service loads it."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    folder = MODELS / "diffusion" / "tiny-kandinsky22"
    assert (folder / "model_index.json").is_file(), f"{folder} is missing; run `make models`"
    pipe = diffusers.AutoPipelineForText2Image.from_pretrained(folder, local_files_only=True)
    assert type(pipe).__name__ == "KandinskyV22CombinedPipeline"
    pipe.set_progress_bar_config(disable=True)
    return pipe


def direct(pipe, seed: int, **kwargs) -> np.ndarray:
    """One diffusers call with the stage's defaults (cfg 7, no negative prompt)."""
    pipe.set_progress_bar_config(disable=True)  # from_pipe does not carry it over
    out = pipe(prompt=FAST["prompt"], num_inference_steps=FAST["steps"], guidance_scale=7.0,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs).images[0]
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


def test_kandinsky_txt2img_is_diffusers_and_repeats(gateway, pipe) -> None:
    events, images = run_chain(gateway, [kandinsky_txt2img()])
    image = image_of(images, "gen")
    assert image.shape == (64, 64, 3)
    assert image.std() > 0
    assert np.abs(image.astype(int) - direct(pipe, FAST["seed"], width=64, height=64)).max() <= 1
    steps = [e.progress.progress for e in events if e.WhichOneof("kind") == "progress" and e.progress.progress.unit == "steps"]
    assert [(p.done, p.total) for p in steps] == [(1, 2), (2, 2)]  # the decoder's steps (the prior's are not reported)

    _, again = run_chain(gateway, [kandinsky_txt2img()])
    assert np.array_equal(image, image_of(again, "gen"))  # same seed, same image

    _, two = run_chain(gateway, [kandinsky_txt2img(count=2)])  # one call, a generator per image
    assert np.abs(image_of(two, "gen", 0).astype(int) - image).max() <= 1
    assert np.abs(image_of(two, "gen", 1).astype(int) - image).mean() > 1  # seed + 1

    _, odd = run_chain(gateway, [kandinsky_txt2img(width=96, height=72)])  # Kandinsky rounds up to 64s
    assert image_of(odd, "gen").shape == (72, 96, 3)


def test_kandinsky_txt2img_then_img2img_hands_over_pixels(gateway, stack: Stack) -> None:
    """Asked for the final tiles only, so latents could travel, but MoVQ's latents are not an SD
    VAE's: txt2img decodes and img2img encodes again (not counted: the counters see `vae` only)."""
    events, _, image = run_counting(gateway, stack, [kandinsky_txt2img(), kandinsky_refine()])
    assert output_formats(events) == {"gen": [RGB8], "refine": [RGB8]}
    assert image.shape == (64, 64, 3)
    assert image.std() > 0


def test_kandinsky_img2img_works_at_the_image_size(gateway, pipe) -> None:
    from diffusers import AutoPipelineForImage2Image
    from PIL import Image

    picture = smooth_image(64, 64, seed=3)
    _, images = run_chain(gateway, [{"name": "in", "type": "source-image"}, kandinsky_refine()], [("in", "image", png(picture))])
    expected = direct(AutoPipelineForImage2Image.from_pipe(pipe), FAST["seed"], image=Image.fromarray(picture), strength=0.6, width=64, height=64)
    assert np.abs(image_of(images, "refine").astype(int) - expected).max() <= 1


def test_kandinsky_inpaint_keeps_the_unmasked_pixels(gateway) -> None:
    stages = [kandinsky_txt2img(), {"name": "paint", "type": "blend-inpaint", "params": {"model": "kandinsky22-inpaint", "mask_blur": 2, **FAST}}]
    _, images = run_chain(gateway, stages, [("paint", "mask", png(square_mask()))])
    generated, painted = image_of(images, "gen").astype(int), image_of(images, "paint").astype(int)
    assert painted.shape == (64, 64, 3)
    outside = np.ones((64, 64), bool)
    outside[12:52, 12:52] = False  # the mask plus its blur
    assert np.array_equal(generated[outside], painted[outside])
    assert np.abs(generated[20:44, 20:44] - painted[20:44, 20:44]).mean() > 5


def test_kandinsky_inpaint_with_the_text_to_image_decoder_is_refused(gateway) -> None:
    stages = [kandinsky_txt2img(), {"name": "paint", "type": "blend-inpaint", "params": {"model": "kandinsky22", **FAST}}]
    error = rpc_error(gateway, chain_request({"stages": stages}, [("paint", "mask", png(square_mask()))]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "param 'model'" in error.details()


def test_kandinsky_decoder_scheduler_takes_no_eta(gateway) -> None:
    error = rpc_error(gateway, chain_request({"stages": [kandinsky_txt2img(eta=0.3)]}))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "param 'eta'" in error.details() and "DDPMScheduler takes no eta" in error.details()


def test_kandinsky_negative_prompt_with_count_is_refused(gateway) -> None:
    error = rpc_error(gateway, chain_request({"stages": [kandinsky_txt2img(count=2, negative_prompt="blurry")]}))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "param 'negative_prompt'" in error.details()
    _, images = run_chain(gateway, [kandinsky_txt2img(negative_prompt="blurry")])  # one image: fine
    assert image_of(images, "gen").shape == (64, 64, 3)
