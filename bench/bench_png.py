"""`make bench`, part 6: the streaming PNG encoder (services/core/png.py) against Pillow's.

Size and time of the PNG of a photo (scikit-image's astronaut, 512²; also with an alpha
channel and in grey), of that photo enlarged to 2048² (Lanczos: smooth, as upscaled output
is), and of uniform noise (incompressible), each encoded whole by Pillow (Image.save, its defaults: zlib level 6) and by
the streaming encoder in bands of 128 rows, as persist gives it. Best of 3 runs each.

Records its section in bench/RESULTS.md between the bench-png:begin/end markers.

Run: python bench/bench_png.py [--no-write]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_chain import machine, results_block, publish  # noqa: E402

from tilechain.services.core.codecs import png_writer  # noqa: E402

BEGIN, END = "<!-- bench-png:begin -->", "<!-- bench-png:end -->"
BAND = 128
RUNS = 3


def photo() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def pillow(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(out, "PNG")
    return out.getvalue()


def streaming(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    height, width, chans = pixels.shape
    writer = png_writer(out, width, height, chans)
    for y in range(0, height, BAND):
        writer.write_rows(pixels[y : y + BAND])
    writer.close()
    return out.getvalue()


def best(encode, pixels: np.ndarray) -> tuple[int, float]:
    times, size = [], 0
    for _ in range(RUNS):
        began = time.perf_counter()
        size = len(encode(pixels))
        times.append(time.perf_counter() - began)
    return size, min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = parser.parse_args()
    image = photo()
    cases = {
        "photo, 512x512 RGB": image,
        "photo + alpha, 512x512 RGBA": np.dstack([image, image[:, :, :1]]),
        "photo, 512x512 L": np.asarray(Image.fromarray(image).convert("L"))[:, :, None],
        "photo enlarged, 2048x2048 RGB": np.asarray(Image.fromarray(image).resize((2048, 2048), Image.Resampling.LANCZOS)),
        "uniform noise, 2048x2048 RGB": np.random.default_rng(0).integers(0, 256, (2048, 2048, 3), dtype=np.uint8),
    }
    rows, size_ratios, time_ratios = [], [], []
    for name, pixels in cases.items():
        (p_size, p_time), (s_size, s_time) = best(pillow, pixels), best(streaming, pixels)
        size_ratios.append(s_size / p_size)
        time_ratios.append(s_time / p_time)
        rows.append(
            f"| {name} | {p_size / 1024:.0f} KiB | {s_size / 1024:.0f} KiB ({100 * (s_size / p_size - 1):+.1f}%) "
            f"| {p_time * 1000:.0f} ms | {s_time * 1000:.0f} ms ({s_time / p_time:.2f}x) |"
        )
    lines = [
        f"Each image encoded whole by Pillow (`Image.save(out, 'PNG')`, zlib level 6, its adaptive filters) and by "
        f"tilechain's streaming encoder in bands of {BAND} rows (the same choice of filter per row, vectorised in numpy; "
        f"level 6, the strategy for filtered data); the photo is scikit-image's astronaut; best of {RUNS}:",
        "",
        "| image | Pillow | streaming | Pillow time | streaming time |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        "",
        f"The streaming encoder is what persist writes PNGs with (and encode_image too): its files are within "
        f"{100 * max(abs(r - 1) for r in size_ratios):.1f}% of Pillow's size, its time {min(time_ratios):.2f}x to "
        f"{max(time_ratios):.2f}x Pillow's (zlib's deflate is most of it either way; the numpy filters the rest).",
    ]
    info = machine()
    block = results_block(BEGIN, END, "bench_png.py", info, "no GPU", info["libs"], "`python bench/bench_png.py`", lines,
                          "PNG: the streaming encoder against Pillow's")
    publish(BEGIN, END, block, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
