"""blend-grid, the blend-denoise stages, the edit family (edit-text, edit-metadata, edit-safety)
and the text family (text-prompt), through the gateway; tiled runs against untiled ones in
process."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import grpc
import numpy as np
import pytest

from tilechain.client import chain_request
from tilechain.services.core.codecs import read_metadata
from tilechain.services.core.tiles import Rect
from tilechain.v1 import gateway_pb2

from .conftest import rpc_error, run_events
from .engine_harness import canvas, random_partition, run_stage
from .test_diffusion import image_of, png, run_chain, txt2img
from .test_upscale_models import smooth_image, stage

NOISE = {"name": "noise", "type": "source-noise", "params": {"width": 48, "height": 40, "seed": 3, "count": 3}}


def photo(size: int = 96) -> np.ndarray:
    from skimage.data import astronaut

    from tilechain.services.core.resample import resize

    return resize(astronaut(), size, size, "lanczos")


def load(picture: np.ndarray) -> tuple[dict, list]:
    return {"name": "photo", "type": "source-image"}, [("photo", "image", png(picture))]


def saved(status) -> tuple[np.ndarray, dict]:
    from tilechain.services.core.codecs import decode_image

    data = Path(urlparse(status.artifacts[0].uri).path).read_bytes()
    return decode_image(data), read_metadata(data)


# --- blend-grid -----------------------------------------------------------------------------


def test_grid_lays_the_images_out_with_labels(gateway) -> None:
    grid = {"name": "grid", "type": "blend-grid", "params": {"width": 2, "order": [2, 0, 1]}}
    events, images = run_chain(gateway, [NOISE, grid])
    sources = [image_of(images, "noise", i) for i in range(3)]
    assert [image_of(images, "grid", i).shape for i in range(4)] == [(40, 48, 3)] * 3 + [(80, 96, 3)]
    out = image_of(images, "grid", 3)
    assert np.array_equal(out[:40, :48], sources[2]) and np.array_equal(out[:40, 48:], sources[0])
    assert np.array_equal(out[40:, :48], sources[1]) and not out[40:, 48:].any()  # an empty cell
    assert all(np.array_equal(image_of(images, "grid", i), sources[i]) for i in range(3))  # passed on first
    labelled = {"name": "grid", "type": "blend-grid", "params": {"width": 3, "rows": ["seed 3"], "columns": ["a", "b", "c"], "title": "noise", "size": 12, "keep_sources": False}}
    _, images = run_chain(gateway, [NOISE, labelled])
    out = image_of(images, "grid", 0)
    height, width = out.shape[:2]
    assert height == 40 + 2 * 18 and width > 3 * 48  # a title band, a column-label band and a row-label column
    assert out[:36].any() and np.array_equal(out[36:, width - 48:], image_of(images, "noise", 2))


@pytest.mark.parametrize("params, fragments", [
    ({"width": 1, "height": 2}, ["param 'height'", "3 images do not fit 2 row(s) of 1"]),
    ({"order": [0, 5]}, ["param 'order'", "5 is not an image index (0..2)"]),
    ({"rows": [1]}, ["param 'rows'", "labels must be strings"]),
])
def test_bad_grid(gateway, params: dict, fragments: list[str]) -> None:
    error = rpc_error(gateway, chain_request({"stages": [NOISE, {"name": "grid", "type": "blend-grid", "params": params}]}))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stage 'grid' (blend-grid)" in error.details()
    for fragment in fragments:
        assert fragment in error.details(), error.details()


# --- blend-denoise --------------------------------------------------------------------------


def noisy_photo(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    clean = smooth_image(96, 96)
    rng = np.random.default_rng(seed)
    noisy = np.clip(clean.astype(int) + rng.normal(0, 12, clean.shape), 0, 255).astype(np.uint8)
    return clean, noisy


@pytest.mark.parametrize("stage_type", ["blend-denoise", "blend-denoise-fastnlmeans", "blend-denoise-localstd"])
def test_denoise_tiled_equals_untiled(stage_type: str) -> None:
    _, noisy = noisy_photo()
    rng = np.random.default_rng(1)

    def run(tile: int) -> np.ndarray:
        denoise = stage(stage_type, {})
        denoise.max_tile = tile
        return run_stage(denoise, [canvas(96, 96)], {0: noisy}, {0: random_partition(96, 96, rng)})[0][0]
    assert np.array_equal(run(32), run(512))


def test_denoise_removes_noise(gateway) -> None:
    clean, noisy = noisy_photo()
    head, attach = load(noisy)
    _, images = run_chain(gateway, [head, {"name": "nl", "type": "blend-denoise-fastnlmeans", "params": {"strength": 10}}], attach)
    error = lambda image: np.abs(image.astype(int) - clean).mean()  # noqa: E731
    assert error(image_of(images, "nl")) < 0.8 * error(noisy)
    salted = clean.copy()
    spots = np.random.default_rng(2).integers(0, 96, (40, 2))
    salted[spots[:, 0], spots[:, 1]] = 255
    head, attach = load(salted)
    _, images = run_chain(gateway, [head, {"name": "std", "type": "blend-denoise-localstd", "params": {}}], attach)
    assert error(image_of(images, "std")) < 0.25 * error(salted)  # the stray pixels are gone
    error = rpc_error(gateway, chain_request({"stages": [head, {"name": "std", "type": "blend-denoise-localstd", "params": {"window": 4}}]}, attach))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stage 'std' (blend-denoise-localstd): param 'window': 4 is even" in error.details()


# --- edit-text, edit-metadata -----------------------------------------------------------------


def test_text_is_drawn_where_asked_and_tiles_agree(gateway) -> None:
    picture = photo()
    head, attach = load(picture)
    params = {"text": "tilechain\nx4", "position": [-4, -4], "anchor": "rd", "size": 16, "fill": "#ffcc00"}
    _, images = run_chain(gateway, [head, {"name": "txt", "type": "edit-text", "params": params}], attach)
    out = image_of(images, "txt")
    changed = np.argwhere((out != picture).any(axis=2))
    assert len(changed) > 50 and changed.min(axis=0).tolist() > [40, 20]  # bottom right only
    assert (out[changed[:, 0], changed[:, 1]] == [255, 204, 0]).all(axis=1).any()  # the fill colour
    text = stage("edit-text", params)
    text.max_tile = 16
    tiled = run_stage(text, [canvas(96, 96)], {0: picture}, {0: [Rect(0, 0, 96, 96)]})[0][0]
    assert np.array_equal(tiled, out)


@pytest.mark.parametrize("params, fragments", [
    ({"text": "a", "font": "no-such-font.ttf"}, ["param 'font'", "cannot open the font 'no-such-font.ttf'"]),
    ({"text": "a", "fill": "bluish"}, ["param 'fill'", "'bluish' is not a colour"]),
    ({"text": "a", "position": [1]}, ["param 'position'", "must be [x, y]"]),
    ({"text": "a\nb", "anchor": "zz"}, ["param 'anchor'", "'zz'"]),
    ({}, ["param 'text'", "is required"]),
])
def test_bad_text(gateway, params: dict, fragments: list[str]) -> None:
    head, attach = load(photo(32))
    error = rpc_error(gateway, chain_request({"stages": [head, {"name": "txt", "type": "edit-text", "params": params}]}, attach))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stage 'txt' (edit-text)" in error.details()
    for fragment in fragments:
        assert fragment in error.details(), error.details()


def test_metadata_reaches_the_file(gateway, output_root: Path) -> None:
    head, attach = load(photo(32))
    meta = {"name": "meta", "type": "edit-metadata", "params": {"note": "a test", "params": {"size": [32, 32]}}}
    save = {"name": "save", "type": "persist-disk", "params": {"filename": "edit/{job}-meta.png"}}
    status = run_events(gateway, chain_request({"stages": [head, meta, save]}, attach))[-1].status
    assert status.state == gateway_pb2.JOB_STATE_SUCCEEDED, status
    pixels, metadata = saved(status)
    assert np.array_equal(pixels, photo(32))
    assert metadata["note"] == "a test" and metadata["params"] == {"size": [32, 32]}
    assert [s["name"] for s in metadata["stages"]] == ["photo", "meta", "save"]


# --- text-prompt ----------------------------------------------------------------------------


def test_text_prompt_hands_its_prompt_to_the_diffusion_stage(gateway, output_root: Path) -> None:
    prompt = {"name": "prompt", "type": "text-prompt", "params": {"prompt": "a lighthouse, blurry", "remove_tokens": r",\s*blurry", "add_suffix": "at dusk"}}
    save = {"name": "save", "type": "persist-disk", "params": {"filename": "text/{job}.png"}}
    gen = txt2img(prompt="")
    events = run_events(gateway, chain_request({"stages": [prompt, gen, save]}))
    pixels, metadata = saved(events[-1].status)
    assert [s["name"] for s in metadata["stages"]] == ["gen", "save"]  # a source stage starts the history
    assert metadata["stages"][0]["params"]["prompt"] == "a lighthouse, at dusk"  # the prompt txt2img used
    _, direct = run_chain(gateway, [txt2img(prompt="a lighthouse, at dusk")])
    assert np.array_equal(pixels, image_of(direct, "gen"))
    started = [e.stage for e in events if e.WhichOneof("kind") == "stage" and e.stage.name == "prompt"]
    assert started[0].outputs[0].width == 512  # no image before it: the prompt card carries it


def test_a_prompt_model_extends_the_prompt(gateway) -> None:
    """The tiny random GPT-2 of models.yaml's prompts: greedy, so the same prompt always gives
    the same extension (the gateway plans with it and the service runs with it)."""
    prompt = {"name": "prompt", "type": "text-prompt", "params": {"prompt": "a lighthouse", "model": "magic-prompt", "min_length": 40}}

    def used() -> str:
        events = run_events(gateway, chain_request({"stages": [prompt, txt2img(prompt="")]}))
        assert events[-1].status.state == gateway_pb2.JOB_STATE_SUCCEEDED
        [gen] = [e.stage for e in events if e.WhichOneof("kind") == "stage" and e.stage.name == "gen" and e.stage.outputs]
        from tilechain.services.core.params import struct_to_dict

        return struct_to_dict(gen.outputs[0].provenance)["stages"][0]["params"]["prompt"]
    first = used()
    assert first.startswith("a lighthouse") and len(first) >= 40
    assert used() == first


def test_bad_text_prompt(gateway) -> None:
    for params, fragments in [
        ({"remove_tokens": "(unclosed"}, ["param 'remove_tokens'", "not a regular expression"]),
        ({"model": "nope"}, ["param 'model'", "unknown model 'nope'"]),
    ]:
        error = rpc_error(gateway, chain_request({"stages": [{"name": "p", "type": "text-prompt", "params": {"prompt": "a", **params}}]}))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "stage 'p' (text-prompt)" in error.details()
        for fragment in fragments:
            assert fragment in error.details(), error.details()


# --- edit-safety ----------------------------------------------------------------------------


def safety(gateway, output_root: Path, **params):
    head, attach = load(photo(64))
    check = {"name": "check", "type": "edit-safety", "params": params}
    save = {"name": "save", "type": "persist-disk", "params": {"filename": "safety/{job}.png"}}
    return run_events(gateway, chain_request({"stages": [head, check, save]}, attach), timeout=120)


def notices(events) -> list[str]:
    return [e.notice.message for e in events if e.WhichOneof("kind") == "notice"]


def test_safety_passes_blurs_drops_or_stops(gateway, output_root: Path) -> None:
    events = safety(gateway, output_root)  # the tiny checker's thresholds flag nothing by default
    pixels, _ = saved(events[-1].status)
    assert np.array_equal(pixels, photo(64)) and notices(events) == ["image 0: passed the safety check"]
    events = safety(gateway, output_root, adjustment=2.0)  # every concept score above 0: flagged
    pixels, _ = saved(events[-1].status)
    assert notices(events) == ["image 0: flagged by the safety checker; blurred"]
    assert pixels.std() < photo(64).std() and np.abs(pixels.astype(int) - photo(64)).mean() > 5
    events = safety(gateway, output_root, adjustment=2.0, action="drop")
    assert not saved(events[-1].status)[0].any()
    before = sorted(output_root.glob("safety/*"))
    with pytest.raises(grpc.RpcError) as info:
        safety(gateway, output_root, adjustment=2.0, action="fail")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "stage 'check' (edit-safety): image 0 was flagged by the safety checker" in info.value.details()
    assert sorted(output_root.glob("safety/*")) == before  # nothing written after it


def test_unknown_safety_checker(gateway) -> None:
    head, attach = load(photo(32))
    error = rpc_error(gateway, chain_request({"stages": [head, {"name": "check", "type": "edit-safety", "params": {"model": "nope"}}]}, attach))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stage 'check' (edit-safety): param 'model': unknown model 'nope' (models.yaml safety: safety-checker" in error.details()


def test_edit_and_text_are_families_on_their_own_ports() -> None:
    from tilechain.services.core.config import DEFAULT_PORTS, FAMILIES
    from tilechain.services.core.stage import load_all

    assert (DEFAULT_PORTS["edit"], DEFAULT_PORTS["text"]) == (50057, 50058)
    assert {"edit", "text"} <= set(FAMILIES)
    for name, cls in load_all().items():
        assert name.split("-", 1)[0] == cls.family  # the prefix names the family
