"""Diffusion stages on diffusers, through the gateway, with the tiny random-weight models that
`make models` builds (64 px images, 2 steps: CPU-sized)."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from tilechain.client import TileAssembler, chain_request
from tilechain.services.core.codecs import encode_image
from tilechain.services.core.tiles import plan_windows, transport_grid
from tilechain.stack import Stack
from tilechain.v1 import gateway_pb2

from .conftest import ROOT, rpc_error, run_events
from .engine_harness import canvas, run_stage
from .test_cancel import stats
from .test_upscale_models import smooth_image, stage

MODELS = ROOT / "var" / "models"
FAST = {"steps": 2, "prompt": "a lighthouse at dusk", "seed": 5}


def run_chain(gateway, stages: list[dict], attachments=(), timeout: float = 300) -> tuple[list, TileAssembler]:
    """Run a chain returning every stage's tiles; the events and the assembled images."""
    events = run_events(gateway, chain_request({"stages": stages}, list(attachments), return_tiles=gateway_pb2.TILE_RETURN_ALL), timeout)
    assert events[-1].status.state == gateway_pb2.JOB_STATE_SUCCEEDED, events[-1].status
    images = TileAssembler()
    for event in events:
        if event.WhichOneof("kind") == "tile":
            images.add(event.tile)
    return events, images


def image_of(images: TileAssembler, stage: str, canvas_id: int = 0) -> np.ndarray:
    return images.images[(stage, canvas_id)]


def txt2img(name: str = "gen", **params) -> dict:
    return {"name": name, "type": "source-txt2img", "params": {"width": 64, "height": 64, **FAST, **params}}


def png(pixels: np.ndarray) -> bytes:
    return encode_image(pixels, "png")


def square_mask(size: int = 64, lo: int = 16, hi: int = 48) -> np.ndarray:
    mask = np.zeros((size, size, 1), np.uint8)
    mask[lo:hi, lo:hi] = 255
    return mask


# --- each stage, against diffusers itself ------------------------------------------------------


def direct_txt2img(seed: int, **extra) -> np.ndarray:
    """The same generation as one diffusers call in this process."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODELS / "diffusion" / "tiny-sd15", safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # models.yaml's choice
    pipe.set_progress_bar_config(disable=True)
    out = pipe(FAST["prompt"], width=64, height=64, num_inference_steps=FAST["steps"], guidance_scale=7.0,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **extra).images[0]
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


def test_txt2img_equals_diffusers_and_streams_steps(gateway) -> None:
    events, images = run_chain(gateway, [txt2img(count=2)])
    first, second = image_of(images, "gen", 0), image_of(images, "gen", 1)
    assert first.shape == (64, 64, 3)
    assert np.abs(first.astype(int) - direct_txt2img(5)).max() <= 1
    assert np.abs(second.astype(int) - direct_txt2img(6)).max() <= 1  # image i uses seed + i
    steps = [e.progress.progress for e in events if e.WhichOneof("kind") == "progress" and e.progress.progress.unit == "steps"]
    assert [(p.done, p.total) for p in steps] == [(1, 2), (2, 2)]


def test_same_seed_same_image_and_scheduler_by_name(gateway) -> None:
    _, a = run_chain(gateway, [txt2img(seed=9)])
    _, b = run_chain(gateway, [txt2img(seed=9)])
    _, ddim = run_chain(gateway, [txt2img(seed=9, scheduler="DDIMScheduler", eta=0.5)])
    assert np.array_equal(image_of(a, "gen"), image_of(b, "gen"))
    assert not np.array_equal(image_of(a, "gen"), image_of(ddim, "gen"))


def test_lora_load_and_unload(gateway) -> None:
    _, plain = run_chain(gateway, [txt2img(seed=11)])
    _, styled = run_chain(gateway, [txt2img(seed=11, loras={"sd15-style": 1.0})])
    _, after = run_chain(gateway, [txt2img(seed=11)])
    assert (image_of(plain, "gen") != image_of(styled, "gen")).mean() > 0.1
    assert np.array_equal(image_of(plain, "gen"), image_of(after, "gen"))  # the LoRA is off again


def test_sdxl_and_refiner(gateway) -> None:
    _, images = run_chain(gateway, [
        txt2img(model="sdxl"),
        {"name": "refine", "type": "blend-img2img", "params": {"model": "sdxl-refiner", "strength": 0.5, **FAST}},
    ])
    assert image_of(images, "gen").shape == image_of(images, "refine").shape == (64, 64, 3)
    assert not np.array_equal(image_of(images, "gen"), image_of(images, "refine"))


# --- the diffusers chains ---------------------------------------------------------------------


def test_txt2img_then_img2img(gateway) -> None:
    _, images = run_chain(gateway, [txt2img(), {"name": "refine", "type": "blend-img2img", "params": {"strength": 0.6, **FAST}}])
    generated, refined = image_of(images, "gen"), image_of(images, "refine")
    assert refined.shape == (64, 64, 3)
    assert not np.array_equal(generated, refined)


def test_img2img_count_makes_variants_in_one_call(gateway) -> None:
    """count=2 on two input images: four outputs, image i's variant v at index 2i + v with seed
    + v; variant 0 is the count=1 image; steps are reported once per batched call."""
    refine = {"name": "refine", "type": "blend-img2img", "params": {"strength": 0.6, **FAST}}
    _, single = run_chain(gateway, [txt2img(count=2), refine])
    events, images = run_chain(gateway, [txt2img(count=2), {**refine, "params": {**refine["params"], "count": 2}}])
    started = next(e.stage for e in events if e.WhichOneof("kind") == "stage" and e.stage.name == "refine")
    assert [c.index for c in started.outputs] == [0, 1, 2, 3]
    variants = [image_of(images, "refine", i).astype(int) for i in range(4)]
    assert np.abs(variants[0] - image_of(single, "refine", 0)).max() <= 2
    assert np.abs(variants[2] - image_of(single, "refine", 1)).max() <= 2
    assert np.abs(variants[0] - variants[1]).mean() > 1  # another seed, another image
    steps = [e.progress.progress for e in events if e.WhichOneof("kind") == "progress" and e.progress.progress.unit == "steps" and e.progress.name == "refine"]
    assert steps[-1].done == steps[-1].total == 2 * 1  # two calls (one per input image) of one step (0.6 x 2)


@pytest.mark.parametrize("model", ["sd15-inpaint", "sd15"])  # a 9-channel checkpoint; masked img2img
def test_txt2img_then_inpaint_keeps_the_unmasked_pixels(gateway, model: str) -> None:
    stages = [txt2img(), {"name": "paint", "type": "blend-inpaint", "params": {"model": model, "mask_blur": 2, **FAST}}]
    _, images = run_chain(gateway, stages, [("paint", "mask", png(square_mask()))])
    generated, painted = image_of(images, "gen").astype(int), image_of(images, "paint").astype(int)
    outside = np.ones((64, 64), bool)
    outside[12:52, 12:52] = False  # the mask plus its blur
    assert np.array_equal(generated[outside], painted[outside])
    assert np.abs(generated[20:44, 20:44] - painted[20:44, 20:44]).mean() > 5


def test_inpaint_count_keeps_the_unmasked_pixels_in_every_variant(gateway) -> None:
    stages = [txt2img(), {"name": "paint", "type": "blend-inpaint", "params": {"mask_blur": 2, "count": 3, **FAST}}]
    _, images = run_chain(gateway, stages, [("paint", "mask", png(square_mask()))])
    generated = image_of(images, "gen").astype(int)
    outside = np.ones((64, 64), bool)
    outside[12:52, 12:52] = False
    painted = [image_of(images, "paint", v).astype(int) for v in range(3)]
    for image in painted:
        assert np.array_equal(generated[outside], image[outside])
    assert np.abs(painted[0][20:44, 20:44] - painted[2][20:44, 20:44]).mean() > 1


def test_inpaint_then_img2img(gateway) -> None:
    image = smooth_image(64, 64, seed=1)
    _, images = run_chain(gateway, [
        {"name": "in", "type": "source-image"},
        {"name": "paint", "type": "blend-inpaint", "params": FAST},
        {"name": "refine", "type": "blend-img2img", "params": {"strength": 0.5, **FAST}},
    ], [("in", "image", png(image)), ("paint", "mask", png(square_mask()))])
    assert image_of(images, "refine").shape == (64, 64, 3)


def test_img2img_then_latent_x2_then_x4(gateway, output_root: Path) -> None:
    image = smooth_image(64, 64, seed=2)
    events, images = run_chain(gateway, [
        {"name": "in", "type": "source-image"},
        {"name": "refine", "type": "blend-img2img", "params": {"strength": 0.5, **FAST}},
        {"name": "x2", "type": "upscale-latent", "params": FAST},
        {"name": "x4", "type": "upscale-stable-diffusion", "params": {"noise_level": 30, **FAST}},
        {"name": "save", "type": "persist-disk", "params": {"filename": "diffusion/{job}.png"}},
    ], [("in", "image", png(image))])
    assert image_of(images, "x2").shape == (128, 128, 3)
    assert image_of(images, "x4").shape == (512, 512, 3)
    [artifact] = events[-1].status.artifacts
    assert (artifact.width, artifact.height) == (512, 512)


def test_outpaint_extends_and_keeps_the_original(gateway) -> None:
    image = smooth_image(64, 64, seed=4)
    _, images = run_chain(gateway, [
        {"name": "in", "type": "source-image"},
        {"name": "wide", "type": "upscale-outpaint", "params": {"left": 32, "right": 16, "top": 0, "bottom": 8, "mask_blur": 2, **FAST}},
    ], [("in", "image", png(image))])
    out = image_of(images, "wide")
    assert out.shape == (72, 112, 3)
    assert np.array_equal(out[4:60, 36:92], image[4:60, 4:60])  # the original, away from its blurred edge
    assert out[:, :28].std() > 0  # the new border is painted


# --- tiles and seams --------------------------------------------------------------------------


def img2img_stage(**params):
    return stage("blend-img2img", {"strength": 0.5, "steps": 3, "seed": 2, "prompt": "x", **params})


def column_steps(image: np.ndarray) -> np.ndarray:
    """steps[x - 1] = mean |I[:, x] - I[:, x - 1]|: how sharply the image changes at column x."""
    return np.abs(np.diff(image.astype(np.float32), axis=1)).mean(axis=(0, 2))


def seam_ratio(image: np.ndarray, tile: int, overlap: int) -> float:
    """The mean column step at the columns where a tile starts or ends, over the mean at every
    other column. A seam is a column where neighbouring tiles disagree: the change there is
    larger than the image's own change from column to column. 1 means no visible seam."""
    width = image.shape[1]
    windows = plan_windows(width, image.shape[0], tile, overlap)
    edges = sorted({w.x for w in windows if w.x > 0} | {w.x1 for w in windows if w.x1 < width})
    steps = column_steps(image)
    at_edges = [x - 1 for x in edges]
    return float(steps[at_edges].mean() / np.delete(steps, at_edges).mean())


def test_tiled_img2img_seams_are_no_worse_than_the_interior() -> None:
    """192 px in 64 px tiles. Feathered tiles (overlap 16) must show no seam: the change across
    tile edges within 20% of the interior's. The same measure on hard-edged tiles (overlap 0)
    finds their seams, so it is able to fail."""
    image = smooth_image(192, 192, seed=3)
    outputs = {}
    for overlap in (0, 16):
        outputs[overlap] = run_stage(img2img_stage(tile=64, overlap=overlap), [canvas(192, 192)], {0: image},
                                     {0: transport_grid(192, 192, 64)})[0][0]
    assert seam_ratio(outputs[0], 64, 0) > 1.5
    assert seam_ratio(outputs[16], 64, 16) < 1.2


def test_a_mask_free_tile_passes_through() -> None:
    inpaint = stage("blend-inpaint", {**FAST, "tile": 64, "overlap": 0})
    image = smooth_image(128, 64, seed=5)
    mask = np.zeros((64, 128, 1), np.uint8)
    mask[16:48, 80:112] = 255  # only in the right-hand tile
    from tilechain.services.core.stage import L8, MASK

    out = run_stage(inpaint, [canvas(128, 64), canvas(128, 64, id=1, fmt=L8, role=MASK, attached=True)], {0: image, 1: mask},
                    {0: transport_grid(128, 64, 64), 1: transport_grid(128, 64, 64)})[0][0]
    assert np.array_equal(out[:, :64], image[:, :64])
    assert not np.array_equal(out[:, 64:], image[:, 64:])


# --- bad input and cancel ---------------------------------------------------------------------


BAD = {
    "unknown model": (txt2img(model="sd99"), "source-txt2img", ["param 'model'", "unknown model 'sd99'", "sd15"]),
    "model of the wrong kind": (txt2img(model="sd15-inpaint"), "source-txt2img", ["param 'model'", "inpainting checkpoint", "needs text-to-image"]),
    "unknown scheduler": (txt2img(scheduler="FastestScheduler"), "source-txt2img", ["param 'scheduler'", "not a diffusers scheduler"]),
    "eta without an eta scheduler": (txt2img(eta=0.3), "source-txt2img", ["param 'eta'", "EulerDiscreteScheduler takes no eta"]),
    "unknown lora": (txt2img(loras={"nope": 1.0}), "source-txt2img", ["param 'loras'", "unknown model 'nope'"]),
    "size not a multiple of 8": (txt2img(width=100), "source-txt2img", ["param 'width'", "not a multiple of 8"]),
    "image below the latent upscaler's minimum": ({"name": "gen", "type": "upscale-latent", "params": {}}, "upscale-latent", ["param 'image'", "32x32 is below", "64x64"]),
    "strength out of range": ({"name": "gen", "type": "blend-img2img", "params": {"strength": 1.5}}, "blend-img2img", ["param 'strength'", "above the maximum 1"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_diffusion_params(gateway, case: str) -> None:
    stage, stage_type, fragments = BAD[case]
    first = txt2img("first") if stage["type"] != "upscale-latent" else {"name": "first", "type": "source-noise", "params": {"width": 32, "height": 32}}
    stages = [stage] if stage["type"].startswith("source") else [first, stage]
    error = rpc_error(gateway, chain_request({"stages": stages}))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"stage 'gen' ({stage_type})" in error.details()
    for fragment in fragments:
        assert fragment in error.details(), error.details()


def test_mask_size_mismatch(gateway) -> None:
    stages = [txt2img(), {"name": "paint", "type": "blend-inpaint", "params": FAST}]
    error = rpc_error(gateway, chain_request({"stages": stages}, [("paint", "mask", png(square_mask(32, 8, 24)))]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stage 'paint' (blend-inpaint): param 'mask': the mask is 32x32 but the image is 64x64" in error.details()


def test_cancel_stops_within_a_step(gateway, stack: Stack) -> None:
    before = stats(stack, "source")
    call = gateway.RunChain(chain_request({"stages": [txt2img(steps=500)]}))
    for event in call:
        if event.WhichOneof("kind") == "progress" and event.progress.progress.unit == "steps":
            break
    call.cancel()
    after = stats(stack, "source", wait_idle=True)
    assert after.streams_cancelled == before.streams_cancelled + 1
    assert after.steps_run - before.steps_run < 500  # it stopped, long before the last step


def run_behind_a_blocker(gateway, blocker: gateway_pb2.ChainRequest, run, count: int = 3) -> list:
    """Start the long `blocker` chain, wait until its model is busy (its first step), then call
    run(0..count-1) concurrently, so that those calls queue for the model; their results, once
    the blocker has succeeded."""
    from concurrent.futures import ThreadPoolExecutor

    call = gateway.RunChain(blocker)
    for event in call:  # the model is busy from its first step on
        if event.WhichOneof("kind") == "progress" and event.progress.progress.unit == "steps":
            break
    with ThreadPoolExecutor(count) as pool:
        runs = [pool.submit(run, i) for i in range(count)]
        rest = list(call)
        results = [r.result() for r in runs]
    assert rest[-1].status.state == gateway_pb2.JOB_STATE_SUCCEEDED
    return results


def assert_batched_and_alone(results: list, alone: list[np.ndarray]) -> None:
    """Each (events, image) ran in one batch of three and equals its image made alone."""
    for (events, image), expected in zip(results, alone):
        notices = [e.notice.message for e in events if e.WhichOneof("kind") == "notice"]
        assert "ran in one batch with 2 other request(s)" in notices
        assert np.abs(image.astype(int) - expected).max() <= 2


def test_concurrent_txt2img_requests_run_as_one_batch(gateway) -> None:
    """Three requests that arrive while the model is busy with a fourth run as one batch once
    it is free, and each image equals the image its request makes alone."""
    prompts = ["a red barn", "a blue boat", "a green hill"]

    def generated(index: int) -> tuple[list, np.ndarray]:
        events, images = run_chain(gateway, [txt2img(prompt=prompts[index], seed=20 + index)])
        return events, image_of(images, "gen")

    alone = [generated(i)[1] for i in range(3)]
    results = run_behind_a_blocker(gateway, chain_request({"stages": [txt2img(steps=150, seed=1)]}), generated)
    assert_batched_and_alone(results, alone)


def test_concurrent_img2img_requests_run_as_one_batch(gateway) -> None:
    """The same for image-to-image: three requests, each with its own image, prompt and seed,
    queued behind a long one, run as one batch and each gets the image it makes alone."""

    def chain(index: int, **params) -> tuple[list, list]:
        stages = [{"name": "in", "type": "source-image"},
                  {"name": "refine", "type": "blend-img2img", "params": {**FAST, "prompt": f"variation {index}", "seed": 40 + index, "strength": 1.0, **params}}]
        return stages, [("in", "image", png(smooth_image(64, 64, seed=index)))]

    def refined(index: int) -> tuple[list, np.ndarray]:
        events, images = run_chain(gateway, *chain(index))
        return events, image_of(images, "refine")

    alone = [refined(i)[1] for i in range(3)]
    stages, attachments = chain(9, steps=150)
    results = run_behind_a_blocker(gateway, chain_request({"stages": stages}, attachments), refined)
    assert_batched_and_alone(results, alone)
    assert np.abs(results[0][1].astype(int) - results[1][1]).mean() > 1


def test_merge_calls_repeats_each_calls_image_per_image_it_makes() -> None:
    from PIL import Image

    from tilechain.services.core.diffusion import batch_key, generator, merge_calls

    latents = [torch.full((1, 4, 8, 8), float(i)) for i in range(2)]
    calls = [
        {"prompt": "a", "image": latents[0], "generator": [generator(1)], "num_images_per_prompt": 1, "strength": 0.5},
        {"prompt": "b", "image": latents[1], "generator": [generator(2), generator(3)], "num_images_per_prompt": 2, "strength": 0.5},
    ]
    merged = merge_calls(calls)
    assert merged["prompt"] == ["a", "b", "b"] and merged["num_images_per_prompt"] == 1
    assert merged["image"].shape == (3, 4, 8, 8) and merged["image"][:, 0, 0, 0].tolist() == [0.0, 1.0, 1.0]
    assert len(merged["generator"]) == 3
    assert batch_key("img2img", "", {}, calls[0]) == batch_key("img2img", "", {}, calls[1])
    smaller = dict(calls[0], image=torch.zeros((1, 4, 4, 4)))
    assert batch_key("img2img", "", {}, smaller) != batch_key("img2img", "", {}, calls[0])
    pil = [dict(calls[0], image=Image.new("RGB", (64, 64))), dict(calls[0], image=Image.new("RGB", (64, 32)))]
    assert batch_key("img2img", "", {}, pil[0]) != batch_key("img2img", "", {}, pil[1])
    negative = dict(calls[0], negative_prompt="blurry")
    assert batch_key("img2img", "", {}, negative) != batch_key("img2img", "", {}, calls[0])
    assert merge_calls(calls)["negative_prompt"] is None  # none had one: None, as each alone
    assert merge_calls([negative, dict(negative, prompt="c")])["negative_prompt"] == ["blurry", "blurry"]


def test_services_stay_offline_unless_downloads_are_allowed(monkeypatch, tmp_path: Path) -> None:
    """stay_offline_unless_allowed() (run at service start) sets HF_HUB_OFFLINE, so a hub id
    that is not in the local cache fails at once, naming the model, instead of downloading."""
    from tilechain.services.core.diffusion import RUNTIME, resolve_model
    from tilechain.services.core.models import ModelRegistry, stay_offline_unless_allowed
    from tilechain.services.core.params import ParamError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TILECHAIN_ALLOW_DOWNLOADS", raising=False)
    stay_offline_unless_allowed()
    import os

    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    config = tmp_path / "models.yaml"
    config.write_text("base:\n  remote: {hub: tilechain-tests/no-such-model, family: sd1}\n")
    model = resolve_model(ModelRegistry(config, MODELS), "remote", "txt2img", "source-txt2img")
    with pytest.raises(ParamError) as caught:
        RUNTIME.load(model)
    assert caught.value.param == "model" and "hub:tilechain-tests/no-such-model" in caught.value.message

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TILECHAIN_ALLOW_DOWNLOADS", "1")
    stay_offline_unless_allowed()
    assert "HF_HUB_OFFLINE" not in os.environ
