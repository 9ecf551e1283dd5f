"""The streaming PNG encoder (services/core/png.py): rows in, band by band, give the PNG that
Pillow decodes to exactly those pixels, in every mode persist writes, at odd sizes, with the
metadata where read_metadata finds it (before the pixel data)."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image

from tilechain.services.core.codecs import encode_image, png_writer, read_metadata
from tilechain.services.core.png import PngWriter

RNG = np.random.default_rng(11)
MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def written(pixels: np.ndarray, bands: list[int], metadata: dict | None = None) -> bytes:
    out = io.BytesIO()
    height, width, chans = pixels.shape
    writer = png_writer(out, width, height, chans, metadata)
    y = 0
    for rows in bands:
        writer.write_rows(pixels[y : y + rows])
        y += rows
    writer.close()
    return out.getvalue()


def decoded(data: bytes) -> tuple[str, np.ndarray]:
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image)
        return image.mode, array[:, :, None] if array.ndim == 2 else array


def smooth(height: int, width: int, chans: int) -> np.ndarray:
    """A photo-like image (gradients and some noise): every filter gets chosen somewhere."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 3 + y * c) % 256 for c in range(chans)], axis=2)
    return (base + RNG.integers(0, 4, base.shape)).astype(np.uint8)


@pytest.mark.parametrize("chans", [1, 3, 4])
@pytest.mark.parametrize(("width", "height", "bands"), [
    (1, 1, [1]),
    (257, 3, [1, 2]),
    (131, 67, [7, 1, 59]),       # width not a multiple of anything, uneven bands
    (300, 200, [200]),           # one band, larger than the filter's chunk of rows
])
def test_pillow_decodes_exactly_the_rows_written(chans: int, width: int, height: int, bands: list[int]) -> None:
    for pixels in (RNG.integers(0, 256, (height, width, chans), dtype=np.uint8), smooth(height, width, chans)):
        mode, back = decoded(written(pixels, bands))
        assert mode == MODES[chans]
        assert np.array_equal(back, pixels)


def test_metadata_round_trips_and_comes_before_the_pixels() -> None:
    metadata = {"job": "j-1", "stages": [{"name": "save", "params": {"prompt": "a café"}}]}
    pixels = RNG.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    data = written(pixels, [13, 27], metadata)
    assert read_metadata(data) == metadata
    kinds, pos = [], 8
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        kinds.append(kind)
        pos += 12 + length
    assert kinds[0] == b"IHDR" and kinds[1] == b"tEXt" and kinds[-1] == b"IEND"
    assert set(kinds[2:-1]) == {b"IDAT"}
    # encode_image writes PNGs with the same encoder: the same file either way
    assert encode_image(pixels, "png", metadata) == data


def test_wrong_rows_are_refused() -> None:
    writer = PngWriter(io.BytesIO(), 10, 4, 3)
    with pytest.raises(ValueError, match="rows of uint8 \\(2, 9, 3\\)"):
        writer.write_rows(np.zeros((2, 9, 3), np.uint8))
    writer.write_rows(np.zeros((3, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="5 rows for a PNG 4 rows tall"):
        writer.write_rows(np.zeros((2, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="a PNG 4 rows tall got 3 rows"):
        writer.close()
    with pytest.raises(ValueError, match="only 1 \\(L\\), 3 \\(RGB\\) or 4 \\(RGBA\\)"):
        PngWriter(io.BytesIO(), 10, 4, 2)
