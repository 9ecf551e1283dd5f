"""ControlNet on the diffusion stages, blend-controlnet, blend-pix2pix and upscale-highres, through
the gateway with the tiny random-weight models of `make models` (64 px, 2-4 steps)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from tilechain.client import chain_request
from tilechain.services.core.controlnet import canny, soft_edge
from tilechain.services.core.stage import CONTROL, IMAGE
from tilechain.services.core.tiles import Rect

from .conftest import rpc_error
from .engine_harness import canvas, run_stage
from .test_diffusion import FAST, image_of, png, run_chain, txt2img
from .test_upscale_models import smooth_image, stage


def stripes(size: int = 64) -> np.ndarray:
    """A control image: white bars on black (what a canny preprocessor makes of edges)."""
    image = np.zeros((size, size, 3), np.uint8)
    image[:, ::8] = 255
    return image


def photo() -> dict:
    return {"name": "photo", "type": "source-image"}


# --- ControlNet ------------------------------------------------------------------------------


def test_txt2img_with_an_attached_control_image(gateway) -> None:
    plain = image_of(run_chain(gateway, [txt2img()])[1], "gen")
    control = [("gen", "control", png(stripes()))]
    _, first = run_chain(gateway, [txt2img(control={"canny": 1.0})], control)
    _, again = run_chain(gateway, [txt2img(control={"canny": 1.0})], control)
    _, other = run_chain(gateway, [txt2img(control={"canny": 1.0})], [("gen", "control", png(np.roll(stripes(), 4, axis=1)))])
    guided = image_of(first, "gen")
    assert guided.shape == (64, 64, 3)
    assert np.array_equal(guided, image_of(again, "gen"))  # the seed decides
    assert np.abs(guided.astype(int) - plain).mean() > 1  # the ControlNet steers the image
    assert not np.array_equal(guided, image_of(other, "gen"))  # by its control image


def test_several_controlnets_and_sdxl(gateway) -> None:
    control = [("gen", "control", png(stripes()))]
    _, one = run_chain(gateway, [txt2img(control={"canny": 1.0})], control)
    _, two = run_chain(gateway, [txt2img(control={"canny": 1.0, "softedge": 0.8})], control)
    assert not np.array_equal(image_of(one, "gen"), image_of(two, "gen"))  # MultiControlNet
    _, xl = run_chain(gateway, [txt2img(model="sdxl", control={"sdxl-canny": 1.0})], control)
    assert image_of(xl, "gen").shape == (64, 64, 3)


def test_txt2img_makes_its_control_image_from_the_chain_image(gateway) -> None:
    picture = smooth_image(96, 96)
    chain = [photo(), txt2img(control={"softedge": 1.0})]
    _, made = run_chain(gateway, chain, [("photo", "image", png(picture))])
    # the same control image made here and attached gives the same picture
    edges = soft_edge(_resized(picture, 64), {})
    _, attached = run_chain(gateway, [txt2img(control={"softedge": 1.0})], [("gen", "control", png(edges))])
    assert np.abs(image_of(made, "gen").astype(int) - image_of(attached, "gen")).max() <= 1


def test_a_preprocessor_model_makes_the_control_image(gateway) -> None:
    """preprocessor: depth runs models.yaml's depth estimator (a tiny random DPT) on the image."""
    from tilechain.services.core.preprocessor_models import run_preprocessor

    from .test_upscale_models import REGISTRY

    picture = smooth_image(64, 64)
    _, made = run_chain(gateway, [photo(), txt2img(control={"canny": 1.0}, preprocessor="depth")], [("photo", "image", png(picture))])
    depth = run_preprocessor(REGISTRY.resolve("preprocessors", "depth"), picture)
    assert depth.std() > 1  # a map, not a constant
    _, attached = run_chain(gateway, [txt2img(control={"canny": 1.0})], [("gen", "control", png(depth))])
    assert np.abs(image_of(made, "gen").astype(int) - image_of(attached, "gen")).max() <= 1


def _resized(picture: np.ndarray, size: int) -> np.ndarray:
    from tilechain.services.core.resample import resize

    return resize(picture, size, size, "lanczos")


def test_img2img_and_inpaint_with_control(gateway) -> None:
    picture = smooth_image(64, 64)
    mask = np.zeros((64, 64, 1), np.uint8)
    mask[16:48, 16:48] = 255
    img2img = {"name": "refine", "type": "blend-img2img", "params": {**FAST, "strength": 0.5, "control": {"canny": 1.0}}}
    _, plain = run_chain(gateway, [photo(), {**img2img, "params": {**FAST, "strength": 0.5}}], [("photo", "image", png(picture))])
    _, guided = run_chain(gateway, [photo(), img2img], [("photo", "image", png(picture))])
    assert image_of(guided, "refine").shape == (64, 64, 3)
    assert not np.array_equal(image_of(guided, "refine"), image_of(plain, "refine"))
    inpaint = {"name": "paint", "type": "blend-inpaint", "params": {**FAST, "model": "sd15", "control": {"canny": 0.7}}}
    _, painted = run_chain(gateway, [photo(), inpaint], [("photo", "image", png(picture)), ("paint", "mask", png(mask)), ("paint", "control", png(stripes()))])
    out = image_of(painted, "paint")
    assert np.array_equal(out[:8], picture[:8])  # far from the mask: untouched
    assert not np.array_equal(out[24:40, 24:40], picture[24:40, 24:40])


def test_blend_controlnet_redraws_along_the_input(gateway) -> None:
    picture = smooth_image(64, 64)
    chain = [photo(), {"name": "cn", "type": "blend-controlnet", "params": FAST}]
    _, first = run_chain(gateway, chain, [("photo", "image", png(picture))])
    _, again = run_chain(gateway, chain, [("photo", "image", png(picture))])
    assert image_of(first, "cn").shape == (64, 64, 3)
    assert np.array_equal(image_of(first, "cn"), image_of(again, "cn"))


def test_the_control_tile_follows_the_image_tile() -> None:
    """On a canvas larger than the tile each processing tile is conditioned on the control
    image under it: the attached control image's window, or the preprocessor on the tile."""
    picture = smooth_image(128, 96)
    control = np.zeros((96, 128, 3), np.uint8)
    control[::5] = 255
    seen: list[tuple[Rect, np.ndarray]] = []
    img2img = stage("blend-img2img", {**FAST, "tile": 64, "overlap": 16, "control": {"canny": 1.0}})
    record = img2img.control_call

    def spy(work):
        call = record(work)
        seen.append((work.window, call["control_image"][0]))
        return call
    img2img.control_call = spy
    inputs = [canvas(128, 96), canvas(128, 96, id=1, role=CONTROL, attached=True)]
    out, _ = run_stage(img2img, inputs, {0: picture, 1: control}, {0: [Rect(0, 0, 128, 96)], 1: [Rect(0, 0, 128, 96)]})
    assert out[0].shape == (96, 128, 3) and len(seen) == 6  # 3 x 2 tiles of 64 with 16 overlap
    for window, image in seen:
        assert np.array_equal(image, control[window.slices])
    seen.clear()
    made = stage("blend-img2img", {**FAST, "tile": 64, "overlap": 16, "control": {"canny": 1.0}})
    record = made.control_call
    made.control_call = spy
    run_stage(made, [canvas(128, 96)], {0: picture}, {0: [Rect(0, 0, 128, 96)]})
    for window, image in seen:
        assert np.array_equal(image, canny(picture[window.slices], made.p))


CONTROL_BAD = {
    "unknown controlnet": ({"control": {"nope": 1.0}}, [], ["param 'control'", "unknown model 'nope'", "canny"]),
    "controlnet of another family": ({"control": {"sdxl-canny": 1.0}}, [], ["param 'control'", "for sdxl models", "'sd15' (sd1)"]),
    "weight out of range": ({"control": {"canny": 3}}, [], ["param 'control'", "from 0 to 2"]),
    "no control image": ({"control": {"canny": 1.0}}, [], ["param 'control'", "needs a control image"]),
    "control image without a controlnet": ({}, ["control"], ["param 'control'", "no ControlNet: set control"]),
    "unknown preprocessor": ({"control": {"canny": 1.0}, "preprocessor": "normals"}, ["control"], ["param 'preprocessor'", "unknown preprocessor 'normals'", "soft-edge, none, depth"]),
    "model without controlnet pipelines": ({"model": "kandinsky22", "control": {"canny": 1.0}}, ["control"], ["param 'control'", "runs on sd1, sd2 and sdxl"]),
}


@pytest.mark.parametrize("case", list(CONTROL_BAD))
def test_bad_control(gateway, case: str) -> None:
    params, attach, fragments = CONTROL_BAD[case]
    attachments = [("gen", "control", png(stripes()))] if attach else []
    error = rpc_error(gateway, chain_request({"stages": [txt2img(**params)]}, attachments))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stage 'gen' (source-txt2img)" in error.details()
    for fragment in fragments:
        assert fragment in error.details(), error.details()


def test_control_image_of_the_wrong_size_and_a_bad_role(gateway) -> None:
    chain = [photo(), {"name": "refine", "type": "blend-img2img", "params": {**FAST, "control": {"canny": 1.0}}}]
    error = rpc_error(gateway, chain_request({"stages": chain}, [("photo", "image", png(smooth_image(64, 64))), ("refine", "control", png(stripes(32)))]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stage 'refine' (blend-img2img): param 'control': the attached control image is 32x32 but the image is 64x64" in error.details()
    error = rpc_error(gateway, chain_request({"stages": [txt2img()]}, [("gen", "depth", png(stripes()))]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "attachment role 'depth' is not one of 'image', 'mask', 'control'" in error.details()


# --- InstructPix2Pix --------------------------------------------------------------------------


def test_pix2pix(gateway) -> None:
    picture = smooth_image(64, 64)
    attach = [("photo", "image", png(picture))]

    def edit(**params) -> np.ndarray:
        chain = [photo(), {"name": "edit", "type": "blend-pix2pix", "params": {**FAST, "prompt": "make it snow", **params}}]
        return image_of(run_chain(gateway, chain, attach)[1], "edit")
    first = edit()
    assert first.shape == (64, 64, 3)
    assert np.array_equal(first, edit())
    assert not np.array_equal(first, edit(image_guidance=3.0))
    chain = [photo(), {"name": "edit", "type": "blend-pix2pix", "params": {**FAST, "model": "sd15"}}]
    error = rpc_error(gateway, chain_request({"stages": chain}, attach))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stage 'edit' (blend-pix2pix): param 'model': 'sd15' is a sd1 model" in error.details()
    assert "needs instruction editing" in error.details()


# --- highres ----------------------------------------------------------------------------------


def test_highres_upscales_then_refines_in_tiles(gateway) -> None:
    picture = smooth_image(48, 40)
    attach = [("photo", "image", png(picture))]
    params = {**FAST, "steps": 4, "scale": 2, "iterations": 2, "tile": 64, "overlap": 16}
    chain = [photo(), {"name": "hi", "type": "upscale-highres", "params": params}]
    events, first = run_chain(gateway, chain, attach)
    out = image_of(first, "hi")
    assert out.shape == (160, 192, 3)  # 2 ** 2 larger
    assert np.array_equal(out, image_of(run_chain(gateway, chain, attach)[1], "hi"))
    steps = [e.progress.progress for e in events if e.WhichOneof("kind") == "progress" and e.progress.progress.unit == "steps"]
    assert steps and steps[-1].done == steps[-1].total  # both rounds' refining steps, reported as one run
    model = [photo(), {"name": "hi", "type": "upscale-highres", "params": {**params, "iterations": 1, "method": "upscale", "upscaler": "compact-x4"}}]
    assert image_of(run_chain(gateway, model, attach)[1], "hi").shape == (80, 96, 3)


HIGHRES_BAD = {
    "unknown upscaler": ({"method": "upscale", "upscaler": "nope"}, ["param 'upscaler'", "unknown model 'nope'"]),
    "too large": ({"scale": 4, "iterations": 4}, ["param 'scale'", "outside the limit"]),
    "no refining step": ({"strength": 0.1, "steps": 4}, ["param 'strength'", "runs no step"]),
}


@pytest.mark.parametrize("case", list(HIGHRES_BAD))
def test_bad_highres(gateway, case: str) -> None:
    params, fragments = HIGHRES_BAD[case]
    chain = [photo(), {"name": "hi", "type": "upscale-highres", "params": {**FAST, "steps": 4, **params}}]
    error = rpc_error(gateway, chain_request({"stages": chain}, [("photo", "image", png(smooth_image(48, 40)))]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stage 'hi' (upscale-highres)" in error.details()
    for fragment in fragments:
        assert fragment in error.details(), error.details()


def test_role_names_are_the_protos() -> None:
    assert (IMAGE, CONTROL) == (1, 3)
