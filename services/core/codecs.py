"""Pixel formats, tile <-> array conversion and image file encoding, shared by the services,
the gateway (attachments) and the client."""

from __future__ import annotations

import io
import json
from typing import Any, Iterator

import numpy as np
from PIL import Image

from tilechain.v1 import tiles_pb2

from .png import PngWriter
from .tiles import Rect, transport_grid

MAX_TILE_BYTES = 4 * 1024 * 1024
METADATA_KEY = "tilechain"  # the PNG text chunk that holds a file's metadata
PNG_BAND_ROWS = 256  # rows given to the PNG encoder at a time by write_image

CHANNELS = {
    tiles_pb2.PIXEL_FORMAT_RGB8: 3,
    tiles_pb2.PIXEL_FORMAT_RGBA8: 4,
    tiles_pb2.PIXEL_FORMAT_L8: 1,
}
PIL_MODES = {
    tiles_pb2.PIXEL_FORMAT_RGB8: "RGB",
    tiles_pb2.PIXEL_FORMAT_RGBA8: "RGBA",
    tiles_pb2.PIXEL_FORMAT_L8: "L",
}
FORMAT_FOR_CHANNELS = {v: k for k, v in CHANNELS.items()}
LATENT_F32 = tiles_pb2.PIXEL_FORMAT_LATENT_F32


class ImageDecodeError(ValueError):
    pass


def channels(pixel_format: int) -> int:
    return CHANNELS[pixel_format]


def is_latent(canvas: tiles_pb2.Canvas) -> bool:
    return canvas.format == LATENT_F32


def canvas_layout(canvas: tiles_pb2.Canvas) -> tuple[int, np.dtype]:
    """Values per pixel and their type: uint8 for images and masks, float32 for latents.
    ValueError for a format or latent description that cannot be read."""
    if canvas.format == LATENT_F32:
        if not 1 <= canvas.latent.channels <= 64 or not canvas.latent.scale:
            raise ValueError(f"canvas {canvas.id}: a latent canvas needs latent.channels (1..64) and latent.scale")
        return canvas.latent.channels, np.dtype("<f4")  # little-endian on the wire
    if canvas.format not in CHANNELS:
        raise ValueError(f"canvas {canvas.id}: unknown pixel format {canvas.format}")
    return CHANNELS[canvas.format], np.dtype(np.uint8)


def image_size(canvas: tiles_pb2.Canvas) -> tuple[int, int]:
    """The canvas's size in image pixels (a latent canvas counts latent pixels)."""
    scale = canvas.latent.scale if canvas.format == LATENT_F32 else 1
    return canvas.width * scale, canvas.height * scale


def transport_edge(requested: int, bytes_per_pixel: int) -> int:
    """The transport tile edge to use: the requested one, shrunk until a tile fits in a message."""
    edge = requested or 512
    while edge * edge * bytes_per_pixel > MAX_TILE_BYTES:
        edge //= 2
    return edge


def to_pil(pixels: np.ndarray) -> Image.Image:
    if pixels.shape[2] == 1:
        return Image.fromarray(pixels[:, :, 0], "L")
    return Image.fromarray(pixels, "RGBA" if pixels.shape[2] == 4 else "RGB")


def from_pil(image: Image.Image) -> np.ndarray:
    array = np.asarray(image)
    return array[:, :, None] if array.ndim == 2 else array


def decode_image(data: bytes, mask: bool = False) -> np.ndarray:
    """Decode an image file whole to (H, W, C) uint8 by the mode rule of images.py: masks to L,
    images to RGB or RGBA. The gateway never does this to attachments (images.image_tiles)."""
    from .images import decode_image as decode  # images.py builds on this module

    return decode(data, mask)


def encode_image(pixels: np.ndarray, fmt: str, metadata: dict[str, Any] | None = None, quality: int = 95) -> bytes:
    """Encode to png, jpeg or webp, with metadata as JSON: a PNG text chunk 'tilechain', or the
    EXIF ImageDescription for JPEG and WebP."""
    out = io.BytesIO()
    write_image(out, pixels, fmt, metadata, quality)
    return out.getvalue()


def metadata_text(metadata: dict[str, Any]) -> str:
    """The metadata as the files carry it: JSON, ASCII only (a PNG tEXt chunk is Latin-1)."""
    return json.dumps(metadata, sort_keys=True)


def png_writer(out: Any, width: int, height: int, channels: int, metadata: dict[str, Any] | None = None) -> PngWriter:
    """A streaming PNG encoder (core/png.py) writing to out, with the metadata where
    encode_image puts it: a 'tilechain' text chunk, before the pixels. Give it the rows in order
    (write_rows), then close() it. For images too big to hold: the file is written as the rows
    come, nothing of the image is kept."""
    text = {METADATA_KEY: metadata_text(metadata)} if metadata is not None else None
    return PngWriter(out, width, height, channels, text)


def write_image(out: Any, pixels: np.ndarray, fmt: str, metadata: dict[str, Any] | None = None, quality: int = 95) -> None:
    """encode_image into a writable file object, which gets the bytes as the encoder makes them
    (PNG a band of rows at a time, by the streaming encoder that persist uses, so that a PNG is
    the same file whichever way it was written; JPEG a block at a time; Pillow's WebP encoder
    writes the file in one piece)."""
    if fmt == "png":
        height, width, chans = pixels.shape
        writer = png_writer(out, width, height, chans, metadata)
        for y in range(0, height, PNG_BAND_ROWS):
            writer.write_rows(pixels[y : y + PNG_BAND_ROWS])
        writer.close()
    elif fmt in ("jpeg", "webp"):
        image = to_pil(pixels)
        if fmt == "jpeg" and image.mode == "RGBA":
            image = image.convert("RGB")
        exif = Image.Exif()
        if metadata is not None:
            exif[0x010E] = metadata_text(metadata)  # ImageDescription
        image.save(out, fmt.upper(), quality=quality, exif=exif.tobytes())
    else:
        raise ValueError(f"unknown image format {fmt!r}")


CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# formats a source stage reads (Pillow's names)
READABLE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def encoded_header(data: bytes) -> tuple[int, int, int, str]:
    """Width, height, channels (3 or 4, as decode_image gives them) and format from the first
    bytes of an encoded image, without decoding its pixels. ImageDecodeError if they do not
    hold a header of a readable format (more bytes may)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            channels = 4 if image.mode == "RGBA" or "A" in image.getbands() else 3
            width, height = image.size
            fmt = str(image.format)
    except Exception as exc:
        raise ImageDecodeError(f"not a readable image ({type(exc).__name__}: {exc})") from None
    if fmt not in READABLE_FORMATS:
        raise ImageDecodeError(f"a {fmt} image; readable formats: {', '.join(READABLE_FORMATS)}")
    return width, height, channels, fmt


def read_metadata(data: bytes) -> dict[str, Any] | None:
    """The metadata encode_image wrote, or None."""
    with Image.open(io.BytesIO(data)) as image:
        text = image.info.get(METADATA_KEY) if image.format == "PNG" else image.getexif().get(0x010E)
    return json.loads(text) if text else None


def tile_message(canvas_id: int, rect: Rect, pixels: np.ndarray) -> tiles_pb2.Tile:
    """A transport tile of rect cut from a full (H, W, C) canvas array."""
    region = np.ascontiguousarray(pixels[rect.slices])
    return tiles_pb2.Tile(
        canvas_id=canvas_id, x=rect.x, y=rect.y, width=rect.width, height=rect.height, pixels=region.tobytes()
    )


def split_tiles(canvas_id: int, pixels: np.ndarray, edge: int) -> Iterator[tiles_pb2.Tile]:
    height, width, chans = pixels.shape
    for rect in transport_grid(width, height, transport_edge(edge, chans * pixels.itemsize)):
        yield tile_message(canvas_id, rect, pixels)


def tile_rect(tile: tiles_pb2.Tile) -> Rect:
    return Rect(tile.x, tile.y, tile.width, tile.height)


def match_channels(pixels: np.ndarray, target: int) -> np.ndarray:
    """Convert (H, W, C) pixels to target channels: drop or add an opaque alpha, grey to colour."""
    have = pixels.shape[2]
    if have == target:
        return pixels
    if have == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    elif have == 4:
        pixels = pixels[:, :, :3]
    if target == 4:
        alpha = np.full(pixels.shape[:2] + (1,), 255, dtype=np.uint8)
        return np.concatenate([pixels, alpha], axis=2)
    if target == 1:
        return np.asarray(to_pil(np.ascontiguousarray(pixels)).convert("L"))[:, :, None]
    return pixels
