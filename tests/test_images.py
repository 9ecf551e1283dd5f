"""Attached images: every accepted format and mode converts by the documented rule (README,
"Attached images"), PNG decodes in row bands to exactly what a whole decode gives, EXIF
orientation is applied, and the header check refuses before any pixel is decoded."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tilechain.services.core import png
from tilechain.services.core.codecs import ImageDecodeError
from tilechain.services.core.images import (
    RATIO_FLOOR_BYTES,
    decode_image,
    image_tiles,
    limits_message,
    luma,
    read_header,
)

RNG = np.random.default_rng(11)


# --- a PNG writer that Pillow is not: every bit depth and colour type, every filter ---------


def _filter_row(kind: int, row: np.ndarray, prior: np.ndarray, bpp: int) -> np.ndarray:
    row, prior = row.astype(np.int32), prior.astype(np.int32)
    left = np.concatenate([np.zeros(bpp, np.int32), row[:-bpp]])
    upper_left = np.concatenate([np.zeros(bpp, np.int32), prior[:-bpp]])
    if kind == 0:
        out = row
    elif kind == 1:
        out = row - left
    elif kind == 2:
        out = row - prior
    elif kind == 3:
        out = row - (left + prior) // 2
    else:
        p = left + prior - upper_left
        pa, pb, pc = abs(p - left), abs(p - prior), abs(p - upper_left)
        predictor = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prior, upper_left))
        out = row - predictor
    return (out % 256).astype(np.uint8)


def write_png(samples: np.ndarray, depth: int, colour: int, palette: bytes = b"", trns: bytes = b"", exif: bytes = b"") -> bytes:
    """samples: (H, W, channels) unsigned ints at the given depth. Rows cycle through all five
    filter types, so that band boundaries fall on every kind of filter."""
    height, width, chans = samples.shape
    if depth < 8:
        per = 8 // depth
        padded = np.zeros((height, -(-width // per) * per), np.uint8)
        padded[:, :width] = samples[:, :, 0]
        groups = padded.reshape(height, -1, per).astype(np.uint8)
        shifts = np.arange(8 - depth, -1, -depth, dtype=np.uint8)
        raw = np.bitwise_or.reduce(groups << shifts, axis=2).astype(np.uint8)
    elif depth == 8:
        raw = samples.astype(np.uint8).reshape(height, -1)
    else:
        raw = samples.astype(">u2").view(np.uint8).reshape(height, -1)
    bpp = max(1, depth * chans // 8)
    prior = np.zeros(raw.shape[1], np.uint8)
    body = bytearray()
    for y in range(height):
        kind = y % 5
        body += bytes([kind]) + _filter_row(kind, raw[y], prior, bpp).tobytes()
        prior = raw[y]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))
    if exif:
        out += chunk(b"eXIf", exif)
    if palette:
        out += chunk(b"PLTE", palette)
    if trns:
        out += chunk(b"tRNS", trns)
    return out + chunk(b"IDAT", zlib.compress(bytes(body))) + chunk(b"IEND", b"")


def tiles_to_array(data: bytes, mask: bool, edge: int) -> np.ndarray:
    header = read_header(data)
    out = np.full((header.height, header.width, header.channels(mask)), 7, np.uint8)
    seen = np.zeros(out.shape[:2], int)
    for tile in image_tiles(data, header, mask, canvas_id=3, edge=edge):
        assert tile.canvas_id == 3
        region = np.frombuffer(tile.pixels, np.uint8).reshape(tile.height, tile.width, -1)
        out[tile.y : tile.y + tile.height, tile.x : tile.x + tile.width] = region
        seen[tile.y : tile.y + tile.height, tile.x : tile.x + tile.width] += 1
    assert (seen == 1).all()  # a partition: every pixel exactly once
    return out


def grey_to(grey: np.ndarray, mask: bool, alpha: np.ndarray | None = None) -> np.ndarray:
    if mask:
        return grey[:, :, None]
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    return rgb if alpha is None else np.concatenate([rgb, alpha[:, :, None]], axis=2)


def rgb_to(rgb: np.ndarray, mask: bool, alpha: np.ndarray | None = None) -> np.ndarray:
    if mask:
        return luma(rgb)[:, :, None]
    return rgb if alpha is None else np.concatenate([rgb, alpha[:, :, None]], axis=2)


H, W = 37, 29  # odd sizes: partial bytes at the end of packed rows, uneven bands


def png_cases() -> dict[str, tuple[bytes, callable]]:
    """name -> (PNG bytes, mask -> expected canvas pixels by the rule)."""
    cases = {}
    for depth in (1, 2, 4, 8, 16):
        values = RNG.integers(0, 1 << depth, (H, W, 1))
        top8 = (values[:, :, 0] >> 8) if depth == 16 else values[:, :, 0] * (255 // ((1 << depth) - 1))
        cases[f"grey{depth}"] = (write_png(values, depth, 0), lambda m, g=top8.astype(np.uint8): grey_to(g, m))
    key = 5
    values = RNG.integers(0, 16, (H, W, 1))
    values[0, :3] = key
    cases["grey8 colour key"] = (
        write_png(values, 8, 0, trns=struct.pack(">H", key)),
        lambda m, v=values[:, :, 0].astype(np.uint8): grey_to(v, m, np.where(v == key, 0, 255).astype(np.uint8)),
    )
    for depth in (8, 16):
        values = RNG.integers(0, 1 << depth, (H, W, 3))
        top8 = (values >> 8 if depth == 16 else values).astype(np.uint8)
        cases[f"rgb{depth}"] = (write_png(values, depth, 2), lambda m, t=top8: rgb_to(t, m))
        values = RNG.integers(0, 1 << depth, (H, W, 4))
        top8 = (values >> 8 if depth == 16 else values).astype(np.uint8)
        cases[f"rgba{depth}"] = (write_png(values, depth, 6), lambda m, t=top8: rgb_to(t[:, :, :3], m, t[:, :, 3]))
        values = RNG.integers(0, 1 << depth, (H, W, 2))
        top8 = (values >> 8 if depth == 16 else values).astype(np.uint8)
        cases[f"grey+alpha{depth}"] = (write_png(values, depth, 4), lambda m, t=top8: grey_to(t[:, :, 0], m, t[:, :, 1]))
    values = RNG.integers(0, 1 << 16, (H, W, 3))
    values[2, 2] = (1000, 2000, 3000)
    key16 = struct.pack(">HHH", 1000, 2000, 3000)
    keyed = np.all(values == (1000, 2000, 3000), axis=2)
    cases["rgb16 colour key"] = (
        write_png(values, 16, 2, trns=key16),
        lambda m, t=(values >> 8).astype(np.uint8), a=np.where(keyed, 0, 255).astype(np.uint8): rgb_to(t, m, a),
    )
    for depth in (1, 2, 4, 8):
        entries = 1 << depth
        palette = RNG.integers(0, 256, (entries, 3), dtype=np.uint8)
        index = RNG.integers(0, entries, (H, W, 1))
        rgb = palette[index[:, :, 0]]
        cases[f"palette{depth}"] = (write_png(index, depth, 3, palette=palette.tobytes()), lambda m, r=rgb: rgb_to(r, m))
    palette = RNG.integers(0, 256, (16, 3), dtype=np.uint8)
    trns = RNG.integers(0, 256, 10, dtype=np.uint8)  # shorter than the palette: the rest is opaque
    index = RNG.integers(0, 16, (H, W, 1))
    alpha = np.concatenate([trns, np.full(6, 255, np.uint8)])[index[:, :, 0]]
    cases["palette4 with alpha"] = (
        write_png(index, 4, 3, palette=palette.tobytes(), trns=trns.tobytes()),
        lambda m, r=palette[index[:, :, 0]], a=alpha: rgb_to(r, m, a),
    )
    return cases


PNG_CASES = png_cases()


@pytest.mark.parametrize("case", list(PNG_CASES))
@pytest.mark.parametrize("mask", [False, True], ids=["image", "mask"])
def test_png_modes_decode_by_the_rule_in_bands(case: str, mask: bool) -> None:
    data, expected = PNG_CASES[case]
    want = expected(mask)
    header = read_header(data)
    assert header.streams_by_rows and (header.width, header.height) == (W, H)
    assert header.channels(mask) == want.shape[2]
    for edge in (16, 512):  # several bands (every filter type at a band's first row), and one
        assert np.array_equal(tiles_to_array(data, mask, edge), want), edge
    assert np.array_equal(decode_image(data, mask), want)


def test_band_decode_agrees_with_pillow_on_its_own_pngs() -> None:
    """Pillow's encoder picks its own filters; the band decode must still give Pillow's pixels."""
    photo = RNG.integers(0, 256, (300, 257, 3), dtype=np.uint8)
    photo[100:200] = photo[100:200] // 16 * 16  # flat areas make other filters win
    for mode in ("RGB", "RGBA", "L", "P", "1", "LA"):
        image = Image.fromarray(photo).convert(mode) if mode != "RGBA" else Image.fromarray(
            np.concatenate([photo, photo[:, :, :1]], axis=2))
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        data = buffer.getvalue()
        target = "RGB" if mode in ("RGB", "L", "P", "1") else "RGBA"
        expected = np.asarray(image.convert(target))
        assert np.array_equal(tiles_to_array(data, False, 16), expected), mode
        assert np.array_equal(tiles_to_array(data, True, 64)[:, :, 0], np.asarray(image.convert("L"))), mode


def save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def test_other_formats_and_modes_follow_the_rule() -> None:
    rgb = RNG.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    image = Image.fromarray(rgb)
    grey16 = RNG.integers(0, 65536, (24, 40)).astype(np.uint16)
    cases = {
        "bmp rgb": (save(image, "BMP"), rgb),
        "tiff rgb": (save(image, "TIFF"), rgb),
        "tiff 16-bit grey": (save(Image.fromarray(grey16), "TIFF"), np.repeat((grey16 >> 8).astype(np.uint8)[:, :, None], 3, 2)),
        "tiff float": (save(Image.fromarray((grey16 / 65535).astype(np.float32)), "TIFF"),
                       np.repeat(np.rint(grey16 / 65535 * 255).astype(np.uint8)[:, :, None], 3, 2)),
        "tiff cmyk": (save(image.convert("CMYK"), "TIFF"), np.asarray(image.convert("CMYK").convert("RGB"))),
        "webp lossless": (save(image, "WEBP", lossless=True), rgb),
        "gif palette": (save(image.convert("P"), "GIF"), np.asarray(image.convert("P").convert("RGB"))),
        "tiff 1-bit": (save(image.convert("1"), "TIFF"), np.asarray(image.convert("1").convert("RGB"))),
    }
    for name, (data, expected) in cases.items():
        assert np.array_equal(decode_image(data), expected), name
        assert np.array_equal(tiles_to_array(data, False, 16), expected), name
    jpeg = save(image, "JPEG", quality=90)
    assert np.array_equal(decode_image(jpeg), np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))
    cmyk_jpeg = save(image.convert("CMYK"), "JPEG", quality=90)
    assert read_header(cmyk_jpeg).mode == "CMYK"
    assert np.array_equal(decode_image(cmyk_jpeg), np.asarray(Image.open(io.BytesIO(cmyk_jpeg)).convert("RGB")))


def test_animated_images_use_the_first_frame() -> None:
    frames = [Image.fromarray(np.full((16, 16, 3), v, np.uint8)) for v in (10, 200, 90)]
    for fmt, options in (("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True})):
        data = save(frames[0], fmt, save_all=True, append_images=frames[1:], **options)
        if fmt != "GIF":
            assert read_header(data).frames == 3
        assert (decode_image(data) == decode_image(save(frames[0], fmt, **options))).all(), fmt


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation: int) -> None:
    from PIL import ImageOps

    pixels = RNG.integers(0, 256, (37, 23, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    jpeg_like = Image.fromarray(pixels)
    data = save(jpeg_like, "PNG", exif=exif.tobytes())
    header = read_header(data)
    assert header.orientation == orientation
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert (header.width, header.height) == (expected.shape[1], expected.shape[0])
    assert np.array_equal(tiles_to_array(data, False, 16), expected)
    # a format that decodes whole: JPEG, the camera's format
    data = save(jpeg_like, "JPEG", exif=exif.tobytes(), quality=95)
    assert read_header(data).orientation == orientation
    expected_jpeg = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    assert np.array_equal(tiles_to_array(data, False, 16), expected_jpeg)
    # TIFF: Pillow turns it while decoding; the header already gives the displayed size
    data = save(jpeg_like, "TIFF", exif=exif.tobytes())
    header = read_header(data)
    assert (header.width, header.height) == (expected.shape[1], expected.shape[0])
    assert np.array_equal(decode_image(data), expected)


def bomb_png(side: int) -> bytes:
    """A 1-bit PNG claiming side x side pixels, all zero: a few KB that decode to side² x 3 bytes."""
    row = b"\0" * (1 + (side + 7) // 8)
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return (png.SIGNATURE + png.chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + png.chunk(b"IDAT", body) + png.chunk(b"IEND", b""))


def test_header_check_refuses_bombs_and_oversized_images_without_decoding() -> None:
    bomb = bomb_png(8000)
    assert len(bomb) < 10_000
    header = read_header(bomb)
    assert (header.format, header.width, header.height, header.bits) == ("PNG", 8000, 8000, 1)
    message = limits_message(header, len(bomb), mask=False, max_pixels=8192 * 8192, max_ratio=4096)
    assert message and "decompression ratio" in message and "TILECHAIN_MAX_DECODE_RATIO" in message
    message = limits_message(header, len(bomb), mask=False, max_pixels=2048 * 2048, max_ratio=4096)
    assert message and "8000x8000" in message and "TILECHAIN_MAX_PIXELS" in message
    # small images are never bombs, whatever their ratio
    small = bomb_png(1024)
    assert read_header(small).decoded_bytes(False) < RATIO_FLOOR_BYTES
    assert limits_message(read_header(small), len(small), False, 8192 * 8192, 4096) is None


def test_unreadable_and_unaccepted_files_are_refused_by_name() -> None:
    for data, fragment in (
        (b"\x89PNG\r\n\x1a\nnot really", "not"),
        (b"GIF89a", "not"),
        (b"P6\n8 8\n255\n" + bytes(192), "accepted format"),  # PPM: Pillow reads it, we do not
        (save(Image.new("LAB", (8, 8)), "TIFF"), "mode LAB is not accepted"),
    ):
        with pytest.raises(ImageDecodeError) as info:
            read_header(data)
        assert fragment in str(info.value)
        assert "0x" not in str(info.value) and "BytesIO" not in str(info.value)
    truncated = write_png(RNG.integers(0, 256, (64, 64, 3)), 8, 2)
    cut = truncated[: len(truncated) // 2]
    header = read_header(cut)
    with pytest.raises(ImageDecodeError) as info:
        list(image_tiles(cut, header, False, 0, 16))
    assert "PNG" in str(info.value)
