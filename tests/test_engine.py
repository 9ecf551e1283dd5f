"""The streaming tile engine, in-process: arrival order, tiled vs untiled, streaming order,
blending, whole-canvas stages and bad tiles."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image

from tilechain.services.core.resample import FILTERS, resize
from tilechain.services.core.stage import MASK, L8, StageError
from tilechain.services.core.tiles import Rect, feather_weights, plan_windows, transport_grid

from .engine_harness import canvas, make_stage, random_partition, run_stage

PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
}
RNG = np.random.default_rng(0)
IMAGE_200x152 = RNG.integers(0, 256, (152, 200, 3), dtype=np.uint8)


def upscale(pixels: np.ndarray, method: str, scale: int, **overrides) -> np.ndarray:
    height, width = pixels.shape[:2]
    stage = make_stage("upscale-simple", {"method": method, "scale": scale}, **overrides)
    rects = {0: transport_grid(width, height, 40)}
    return run_stage(stage, [canvas(width, height)], {0: pixels}, rects)[0][0]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_any_arrival_order_gives_the_same_canvas(seed: int) -> None:
    rng = np.random.default_rng(seed)
    stage_args = ("upscale-simple", {"method": "bicubic", "scale": 2})
    in_order = run_stage(make_stage(*stage_args, max_tile=64), [canvas(200, 152)], {0: IMAGE_200x152},
                         {0: transport_grid(200, 152, 50)})[0][0]
    rects = random_partition(200, 152, rng)
    rng.shuffle(rects)
    shuffled = run_stage(make_stage(*stage_args, max_tile=64), [canvas(200, 152)], {0: IMAGE_200x152}, {0: rects})[0][0]
    assert np.array_equal(in_order, shuffled)


@pytest.mark.parametrize("method", list(FILTERS))
@pytest.mark.parametrize("scale", [2, 3, 7])
def test_tiled_upscale_equals_untiled(method: str, scale: int) -> None:
    tiled = upscale(IMAGE_200x152, method, scale, max_tile=48)
    whole = resize(IMAGE_200x152, 200 * scale, 152 * scale, method)
    assert np.array_equal(tiled, whole)


@pytest.mark.parametrize("method", list(FILTERS))
@pytest.mark.parametrize("box", [(64, 64), (37, 100), (150, 29)])
def test_tiled_thumbnail_equals_untiled(method: str, box: tuple[int, int]) -> None:
    stage = make_stage("reduce-thumbnail", {"width": box[0], "height": box[1], "method": method}, max_tile=16)
    out = run_stage(stage, [canvas(200, 152)], {0: IMAGE_200x152}, {0: transport_grid(200, 152, 32)})[0][0]
    ratio = min(box[0] / 200, box[1] / 152)
    size = (round(200 * ratio), round(152 * ratio))
    whole = resize(IMAGE_200x152, size[0], size[1], method)
    assert out.shape[:2] == (size[1], size[0])
    assert np.array_equal(out, whole)


@pytest.mark.parametrize("method", list(FILTERS))
def test_resampler_agrees_with_pillow_within_rounding(method: str) -> None:
    for size in ((400, 304), (64, 49), (37, 28)):
        ours = resize(IMAGE_200x152, *size, method).astype(int)
        pillow = np.asarray(Image.fromarray(IMAGE_200x152).resize(size, PIL_FILTERS[method])).astype(int)
        if method == "nearest":
            # exact ties (the centre falls on a pixel edge) round the other way in Pillow's
            # float arithmetic: whole rows or columns, at most one per tie
            differs = (ours != pillow).any(axis=2)
            tie_rows = differs.mean(axis=1) > 0.5
            tie_cols = differs.mean(axis=0) > 0.5
            assert tie_rows.sum() <= 2 and tie_cols.sum() <= 2
            assert not differs[~tie_rows][:, ~tie_cols].any()
        else:
            # Pillow's 8-bit fixed-point coefficients against our float ones
            assert np.abs(ours - pillow).max() <= 2
            assert (np.abs(ours - pillow) > 1).mean() < 0.01


def test_overlapping_tiles_blend_seamlessly() -> None:
    """With overlap the engine feather-blends; for an exact operator the blend of identical
    values must give the untiled result."""
    tiled = upscale(IMAGE_200x152, "bicubic", 2, max_tile=96, overlap=24)
    whole = upscale(IMAGE_200x152, "bicubic", 2, max_tile=0)
    assert np.array_equal(tiled, whole)


def test_feather_weights_sum_to_one_across_an_overlap() -> None:
    windows = plan_windows(200, 64, 80, 16)
    total = np.zeros((64, 200), dtype=np.float32)
    for w in windows:
        total[w.slices] += feather_weights(w, 200, 64, 16)
    # the last window is pulled back flush with the edge: there the sum may exceed one,
    # everywhere else it is exactly one
    assert np.allclose(total[:, :120], 1.0)
    assert (total > 0).all()


def test_spiral_order_visits_every_tile_once_from_the_outside_in() -> None:
    grid = plan_windows(300, 300, 100, 0, "grid")
    spiral = plan_windows(300, 300, 100, 0, "spiral")
    assert sorted(spiral, key=lambda r: (r.y, r.x)) == grid
    assert spiral[0] == Rect(0, 0, 100, 100) and spiral[-1] == Rect(100, 100, 100, 100)


def test_first_output_tile_leaves_before_the_last_input_tile_arrives() -> None:
    """A local operator streams: once the top rows are in, their output goes out while the
    rest of the input is still to come. The feeder holds back the second half of the input
    until it has seen an output tile (giving up after a while), so the assertion is on the
    order of events, not on times."""
    rects = transport_grid(256, 256, 32)  # 64 input tiles, row-major
    half = len(rects) // 2

    async def gate(i: int, output_seen: asyncio.Event) -> None:
        if i == half:
            try:
                await asyncio.wait_for(output_seen.wait(), timeout=10)
            except asyncio.TimeoutError:
                pass  # the order assertion below fails

    stage = make_stage("upscale-simple", {"method": "nearest", "scale": 2}, max_tile=64)
    pixels = RNG.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    out, log = run_stage(stage, [canvas(256, 256)], {0: pixels}, {0: rects}, transport_tile=32, gate=gate)
    first_out = log.index(("out", 0))
    last_in = log.index(("in", len(rects) - 1))
    assert first_out < last_in
    assert np.array_equal(out[0], pixels.repeat(2, axis=0).repeat(2, axis=1))


def test_whole_canvas_stage_waits_for_the_complete_canvas() -> None:
    """source-noise with histogram fill needs its whole input: no output before the last input."""
    stage = make_stage("source-noise", {"method": "histogram", "width": 64, "height": 64, "seed": 5})
    rects = transport_grid(128, 96, 32)
    pixels = np.zeros((96, 128, 3), dtype=np.uint8)
    pixels[:, :, 0] = 200  # red only: every drawn pixel must be (200, 0, 0)
    out, log = run_stage(stage, [canvas(128, 96)], {0: pixels}, {0: rects}, transport_tile=32)
    assert log.index(("out", 0)) > log.index(("in", len(rects) - 1))
    assert (out[0] == np.array([200, 0, 0], dtype=np.uint8)).all()


def test_mask_canvases_and_several_images() -> None:
    """Two chain images and an attached mask and image: blend-mask makes one output per image."""
    images = {i: RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8) for i in (0, 1)}
    other = RNG.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    mask = np.zeros((40, 60, 1), dtype=np.uint8)
    mask[20:] = 255
    inputs = [
        canvas(60, 40, id=0), canvas(60, 40, id=1), canvas(60, 40, id=2, attached=True),
        canvas(60, 40, id=3, fmt=L8, role=MASK, attached=True),
    ]
    inputs[1].index = 1
    stage = make_stage("blend-mask", {}, max_tile=16)
    pixels = {0: images[0], 1: images[1], 2: other, 3: mask}
    rects = {cid: transport_grid(60, 40, 24) for cid in (3, 1, 2, 0)}
    out, _ = run_stage(stage, inputs, pixels, rects, transport_tile=24)
    for i in (0, 1):
        assert np.array_equal(out[i][:20], images[i][:20])
        assert np.array_equal(out[i][20:], other[20:])


def test_tile_outside_the_canvas_is_rejected() -> None:
    stage = make_stage("reduce-crop", {"width": 8, "height": 8})
    with pytest.raises(StageError, match="outside the 32x32 canvas"):
        run_stage(stage, [canvas(32, 32)], {0: np.zeros((64, 64, 3), np.uint8)}, {0: [Rect(16, 16, 32, 32)]})


def test_overlapping_transport_tiles_are_rejected() -> None:
    stage = make_stage("reduce-crop", {"width": 8, "height": 8})
    with pytest.raises(StageError, match="overlaps"):
        run_stage(stage, [canvas(32, 32)], {0: np.zeros((32, 32, 3), np.uint8)}, {0: [Rect(0, 0, 16, 16), Rect(8, 8, 16, 16)]})


def test_input_that_ends_early_is_an_error() -> None:
    stage = make_stage("reduce-crop", {"width": 32, "height": 32})
    with pytest.raises(StageError, match="input ended before"):
        run_stage(stage, [canvas(32, 32)], {0: np.zeros((32, 32, 3), np.uint8)}, {0: [Rect(0, 0, 16, 32)]})
