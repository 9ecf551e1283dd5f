"""Attached image files: the header check before any pixel is decoded, the rule that turns every
accepted mode into a canvas's RGB8, RGBA8 or L8, and the decode into transport tiles band by
band, so that no process holds a whole decoded attachment (docs/design.md, "Attached images").

The rule (README, "Attached images"):
- images become RGB, or RGBA when the file has alpha (an alpha channel, or a palette or colour
  key with transparency); masks become L (luma, ITU-R 601-2, as Pillow's convert("L"));
- 16-bit samples keep their top 8 bits (as Pillow reads 16-bit colour PNGs): 16-bit grey is
  scaled, not clipped to white; 32-bit integer grey (mode I) is read as 16-bit (clipped to
  0..65535); float grey (mode F) is read as 0..1; 1-, 2- and 4-bit grey are stretched to 0..255;
  palettes, CMYK and YCbCr go through Pillow's conversion to RGB;
- the EXIF orientation is applied (the canvas has the size the photo is shown at);
- of an animation (GIF, APNG, animated WebP, multi-page TIFF) only the first frame is used;
- ICC profiles and gamma are ignored: pixels are taken as sRGB.

Non-interlaced PNG decodes in row bands: the IDAT stream is inflated a band at a time, and each
band is unfiltered by Pillow's own PNG decoder, handed a small PNG that holds the band and the
previous row. The other formats (JPEG, WebP, TIFF, BMP, GIF, interlaced PNG) have no row-band
decode in Pillow: they decode whole, after the header check, in a worker thread, and the
pixels are freed as soon as their tiles are sent."""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import Iterator, Union

import numpy as np
from PIL import Image

from tilechain.v1 import tiles_pb2

from .codecs import ImageDecodeError, transport_edge
from .png import SIGNATURE, chunk
from .tiles import Rect, transport_grid

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF")
# Pillow modes the rule covers; anything else (LAB, HSV, I;16S, ...) is refused by name.
ACCEPTED_MODES = frozenset({
    "1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr",
    "I;16", "I;16B", "I;16L", "I;16N", "I", "F",
})
SIXTEEN_BIT = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})

# Decoded bytes per PNG band: a band passes through a few buffers of about this size.
BAND_BYTES = 4 * 1024 * 1024
# Images decoding to less than this are never refused for their compression ratio: a small
# flat image is not a bomb, whatever its ratio.
RATIO_FLOOR_BYTES = 64 * 1024 * 1024



@dataclass(frozen=True)
class ImageHeader:
    """What a file says about itself before its pixels are decoded."""

    format: str           # PNG, JPEG, WEBP, TIFF, BMP, GIF
    mode: str             # Pillow's mode of the stored pixels
    bits: int             # bits per sample as stored
    stored_width: int
    stored_height: int
    orientation: int      # EXIF orientation 1..8, applied when decoding
    frames: int           # more than 1 for an animation; only the first is used
    alpha: bool           # the file has transparency
    interlaced: bool      # an interlaced PNG (decodes whole)

    @property
    def transposed(self) -> bool:
        return self.orientation >= 5  # the orientations that swap width and height

    @property
    def width(self) -> int:
        return self.stored_height if self.transposed else self.stored_width

    @property
    def height(self) -> int:
        return self.stored_width if self.transposed else self.stored_height

    def channels(self, mask: bool) -> int:
        return 1 if mask else 4 if self.alpha else 3

    def decoded_bytes(self, mask: bool) -> int:
        return self.width * self.height * self.channels(mask)

    @property
    def streams_by_rows(self) -> bool:
        return self.format == "PNG" and not self.interlaced

    def describe(self) -> str:
        frames = f", {self.frames} frames" if self.frames > 1 else ""
        return f"{self.format} {self.width}x{self.height} {self.mode} ({self.bits}-bit{frames})"


Buffer = Union[bytes, bytearray]  # an attached file's bytes (a streamed upload fills a bytearray)


class _Reader(io.RawIOBase):
    """A read-only file over a buffer, without copying it (io.BytesIO copies a bytearray)."""

    def __init__(self, data: Buffer) -> None:
        self.view = memoryview(data)
        self.position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, target) -> int:
        chunk = self.view[self.position : self.position + len(target)]
        target[: len(chunk)] = chunk
        self.position += len(chunk)
        return len(chunk)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: len(self.view)}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position


def _open(data: Buffer) -> Image.Image:
    try:
        return Image.open(io.BufferedReader(_Reader(data)), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError:
        raise ImageDecodeError(f"claims more than {2 * Image.MAX_IMAGE_PIXELS} pixels") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(f"not an image in an accepted format ({', '.join(ACCEPTED_FORMATS)})") from None
    except Exception as exc:  # Pillow raises many types for bad data
        raise ImageDecodeError(f"not a readable image ({type(exc).__name__})") from None


def read_header(data: Buffer) -> ImageHeader:
    """The file's format, size, mode, bit depth, orientation and frame count, from its header
    only (Pillow parses headers on open and decodes pixels on load). ImageDecodeError when
    the file is not an accepted image."""
    with _open(data) as image:
        if image.mode not in ACCEPTED_MODES:
            raise ImageDecodeError(f"{image.format} in mode {image.mode} is not accepted (see README, 'Attached images')")
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageDecodeError("has no pixels")
        interlaced = image.format == "PNG" and bool(image.info.get("interlace"))
        return ImageHeader(
            format=image.format,
            mode=image.mode,
            bits=_bits(image, data),
            stored_width=width,
            stored_height=height,
            orientation=_orientation(image),
            frames=_frames(image),
            alpha=image.mode in ALPHA_MODES or ("transparency" in image.info and image.mode not in SIXTEEN_BIT | {"I", "F"}),
            interlaced=interlaced,
        )


def _bits(image: Image.Image, data: bytes) -> int:
    if image.format == "PNG":
        return data[24]  # IHDR's bit depth: the chunk starts right after the signature
    return {"1": 1, "I": 32, "F": 32}.get(image.mode, 16 if image.mode in SIXTEEN_BIT else 8)


def _orientation(image: Image.Image) -> int:
    """EXIF orientation still to apply, from what the header parse already read. Pillow applies
    a TIFF's orientation itself while decoding (its size is already the displayed one). A PNG's
    eXIf chunk counts only before the pixels (getexif() would decode the image to look after)."""
    try:
        if image.format == "TIFF":
            value = 1
        elif "exif" in image.info:
            exif = Image.Exif()
            exif.load(image.info["exif"])
            value = exif.get(0x0112, 1)
        else:
            value = 1
    except Exception:  # a malformed EXIF block: show the pixels as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _frames(image: Image.Image) -> int:
    # PNG (acTL) and WebP know their frame count from the header; counting GIF or TIFF
    # frames means walking the file, which the check does not do: they report 1.
    if image.format in ("PNG", "WEBP"):
        return int(getattr(image, "n_frames", 1))
    return 1


def limits_message(header: ImageHeader, encoded_bytes: int, mask: bool, max_pixels: int, max_ratio: int) -> str | None:
    """Why an attachment is refused before decoding (None when it is not): more pixels than
    TILECHAIN_MAX_PIXELS, or a decompression bomb (decoded size over TILECHAIN_MAX_DECODE_RATIO
    times the file's size, for images decoding to more than 64 MiB)."""
    pixels = header.width * header.height
    if pixels > max_pixels:
        return (
            f"is {header.width}x{header.height} ({pixels} pixels), over the limit of {max_pixels} pixels "
            "(TILECHAIN_MAX_PIXELS)"
        )
    decoded = header.decoded_bytes(mask)
    if max_ratio and decoded > RATIO_FLOOR_BYTES and decoded > max_ratio * encoded_bytes:
        return (
            f"is a {encoded_bytes}-byte {header.format} that decodes to {header.width}x{header.height} "
            f"({decoded} bytes, {decoded // max(1, encoded_bytes)}x its size), over the decompression "
            f"ratio limit of {max_ratio} (TILECHAIN_MAX_DECODE_RATIO)"
        )
    return None


# --- the mode rule ----------------------------------------------------------------------------


def luma(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 -> (...) uint8 grey, with Pillow's integer ITU-R 601-2 weights, so that a
    mask from a colour file is what convert("L") gives."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def _grey16_to_8(image: Image.Image) -> np.ndarray:
    """16-bit, 32-bit integer and float grey -> 8-bit grey, (H, W)."""
    values = np.asarray(image)
    if image.mode == "F":
        return np.rint(np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * 255).astype(np.uint8)
    return (np.clip(values.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)


def _from_pillow(image: Image.Image, mask: bool, alpha: bool) -> np.ndarray:
    """A decoded Pillow image (any accepted mode) -> (H, W, C) uint8 by the rule."""
    if image.mode in SIXTEEN_BIT or image.mode in ("I", "F"):
        grey = _grey16_to_8(image)
        return grey[:, :, None] if mask else np.repeat(grey[:, :, None], 3, axis=2)
    target = "L" if mask else "RGBA" if alpha else "RGB"
    if image.mode != target:
        image = image.convert(target)
    array = np.asarray(image)
    return array[:, :, None] if array.ndim == 2 else array


def _to_canvas(natural: np.ndarray, mask: bool, alpha: bool) -> np.ndarray:
    """(n, W, 1|2|3|4) 8-bit grey, grey+alpha, RGB or RGBA -> the canvas's channels."""
    chans = natural.shape[2]
    if mask:
        return natural[:, :, :1] if chans <= 2 else luma(natural[:, :, :3])[:, :, None]
    rgb = np.repeat(natural[:, :, :1], 3, axis=2) if chans <= 2 else natural[:, :, :3]
    if not alpha:
        return np.ascontiguousarray(rgb)
    a = natural[:, :, -1:] if chans in (2, 4) else np.full(natural.shape[:2] + (1,), 255, np.uint8)
    return np.concatenate([rgb, a], axis=2)


# --- decoding in bands ------------------------------------------------------------------------


def band_rows(header: ImageHeader, mask: bool, edge: int) -> int:
    """Rows per decoded band: a transport tile's edge, fewer for wide images (the tiles of a
    band are then shorter than wide: a receiver takes any partition)."""
    per_row = header.stored_width * max(header.channels(mask), 2) * (2 if header.bits > 8 else 1)
    return max(1, min(edge, BAND_BYTES // per_row))


def decode_bands(data: Buffer, header: ImageHeader, mask: bool, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first stored row, (n, stored width, C) uint8 pixels by the rule), top to bottom, in
    the stored orientation."""
    if header.streams_by_rows:
        yield from _png_bands(data, header, mask, rows)
        return
    with _open(data) as image:
        try:
            image.load()
        except Exception as exc:
            raise ImageDecodeError(f"not a readable image ({type(exc).__name__} while decoding)") from None
        yield 0, _from_pillow(image, mask, header.alpha)


@dataclass
class _Png:
    width: int
    height: int
    depth: int
    colour: int           # PNG colour type: 0 grey, 2 RGB, 3 palette, 4 grey+alpha, 6 RGBA
    palette: bytes = b""
    transparency: bytes = b""

    @property
    def samples(self) -> int:
        return {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[self.colour]

    @property
    def row_bytes(self) -> int:
        return (self.width * self.depth * self.samples + 7) // 8

    @property
    def pixel_bytes(self) -> int:
        """The filters' 'bpp': bytes per complete pixel, at least one."""
        return max(1, self.depth * self.samples // 8)


def _png_chunks(data: Buffer) -> tuple[_Png, list[memoryview]]:
    view = memoryview(data)
    pos, png, idat = len(SIGNATURE), None, []
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", view[pos : pos + 8])
        body = view[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            png = _Png(width, height, depth, colour)
        elif kind == b"PLTE" and png is not None:
            png.palette = bytes(body)
        elif kind == b"tRNS" and png is not None:
            png.transparency = bytes(body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if png is None or not idat:
        raise ImageDecodeError("not a readable image (a PNG without IHDR or IDAT)")
    return png, idat


def _png_bands(data: Buffer, header: ImageHeader, mask: bool, rows: int) -> Iterator[tuple[int, np.ndarray]]:
    png, idat = _png_chunks(data)
    stride = png.row_bytes + 1  # each row starts with its filter type
    inflater = zlib.decompressobj()
    pieces = iter(idat)
    previous: bytes | None = None  # the last unfiltered row of the band before
    y = 0
    while y < png.height:
        count = min(rows, png.height - y)
        filtered = _inflate(inflater, pieces, count * stride)
        raw = _unfilter(png, filtered, previous, count)
        previous = raw[-1].tobytes()
        yield y, _to_canvas(_png_natural(png, raw), mask, header.alpha)
        y += count


def _inflate(inflater: zlib._Decompress, pieces: Iterator[memoryview], size: int) -> bytes:
    """The next size bytes of the IDAT stream, reading only as much of it as they need."""
    out = bytearray()
    try:
        while len(out) < size:
            source = inflater.unconsumed_tail or next(pieces, None)
            if source is None or inflater.eof:
                raise ImageDecodeError("not a readable image (the PNG's pixel data ends early)")
            out += inflater.decompress(source, size - len(out))
    except zlib.error:
        raise ImageDecodeError("not a readable image (the PNG's pixel data is corrupt)") from None
    return bytes(out)


# An 8-bit PNG format with the same bytes per pixel: its decode undoes the filters and keeps
# every byte as it is (bpp -> bit depth, colour type).
_SAME_BPP = {1: (8, 0), 2: (8, 4), 3: (8, 2), 4: (8, 6)}


def _unfilter(png: _Png, filtered: bytes, previous: bytes | None, count: int) -> np.ndarray:
    """Undo the PNG filters of count rows: (count, row_bytes) uint8. Pillow's decoder does the
    work on a small PNG of the rows, preceded by the previous band's last row stored
    unfiltered (filter type 0) so that the Up, Average and Paeth filters see it."""
    rows = (b"\0" + previous, filtered) if previous is not None else (filtered,)
    height = count + (previous is not None)
    bpp = png.pixel_bytes
    if bpp in _SAME_BPP:
        depth, colour = _SAME_BPP[bpp]
        raw = _decode_small_png(png.row_bytes // bpp, height, depth, colour, rows, None)
    else:  # 16-bit RGB (6) or RGBA (8): decode twice, keeping the high and then the low bytes
        mode = "RGB" if png.colour == 2 else "RGBA"
        high = _decode_small_png(png.width, height, 16, png.colour, rows, f"{mode};16B")
        low = _decode_small_png(png.width, height, 16, png.colour, rows, f"{mode};16L")
        raw = np.stack([high, low], axis=-1)
    return raw.reshape(height, png.row_bytes)[height - count :]


def _decode_small_png(width: int, height: int, depth: int, colour: int, rows: tuple[bytes, ...], rawmode: str | None) -> np.ndarray:
    """Decode rows (filtered PNG scanlines, in pieces) as a PNG of the given format, written
    into one buffer: stored (level 0) deflate, so the only work is Pillow's unfilter."""
    compressor = zlib.compressobj(0)
    idat = [compressor.compress(part) for part in rows] + [compressor.flush()]
    small = io.BytesIO()
    small.write(SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)))
    crc = zlib.crc32(b"IDAT")
    small.write(struct.pack(">I", sum(map(len, idat))) + b"IDAT")
    for part in idat:
        small.write(part)
        crc = zlib.crc32(part, crc)
    del idat
    small.write(struct.pack(">I", crc) + chunk(b"IEND", b""))
    small.seek(0)
    try:
        with Image.open(small, formats=("PNG",)) as image:
            if rawmode is not None:
                image.tile = [image.tile[0]._replace(args=rawmode)]
            image.load()
            return np.asarray(image)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"not a readable image (a bad PNG filter: {type(exc).__name__})") from None


def _png_natural(png: _Png, raw: np.ndarray) -> np.ndarray:
    """Unfiltered PNG rows -> (n, W, 1|2|3|4) 8-bit grey, grey+alpha, RGB or RGBA."""
    count, width = raw.shape[0], png.width
    if png.depth < 8:  # packed: several pixels per byte, most significant bits first
        shifts = np.arange(8 - png.depth, -1, -png.depth, dtype=np.uint8)
        values = ((raw[:, :, None] >> shifts) & ((1 << png.depth) - 1)).reshape(count, -1)[:, :width, None]
        samples = values if png.colour == 3 else values * np.uint8(255 // ((1 << png.depth) - 1))
    elif png.depth == 8:
        values = samples = raw.reshape(count, width, png.samples)
    else:
        pairs = raw.reshape(count, width, png.samples, 2)
        samples = pairs[..., 0]  # big-endian: the top 8 bits
        values = (pairs[..., 0].astype(np.uint16) << 8) | pairs[..., 1]

    if png.colour == 3:  # palette indices, with per-entry alpha from tRNS
        entries = np.frombuffer(png.palette, np.uint8)[: len(png.palette) // 3 * 3].reshape(-1, 3)[:256]
        rgb = np.zeros((256, 3), np.uint8)
        rgb[: len(entries)] = entries
        index = samples[:, :, 0]
        if not png.transparency:
            return rgb[index]
        alpha = np.full(256, 255, np.uint8)
        trns = np.frombuffer(png.transparency, np.uint8)[:256]
        alpha[: len(trns)] = trns
        return np.concatenate([rgb[index], alpha[index][:, :, None]], axis=2)
    if png.colour in (0, 2) and png.transparency:  # a colour key: pixels of exactly that value are transparent
        key = np.frombuffer(png.transparency, ">u2")[: png.samples]
        alpha = np.where(np.all(values == key, axis=2), 0, 255).astype(np.uint8)[:, :, None]
        return np.concatenate([samples, alpha], axis=2)
    return samples


# --- tiles ------------------------------------------------------------------------------------


def _orient(header: ImageHeader, y: int, band: np.ndarray) -> tuple[Rect, np.ndarray]:
    """Where a band of stored rows y..y+n lands in the displayed image, and its pixels there
    (EXIF orientations: 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 clockwise,
    7 transverse, 8 rotate 90 counter-clockwise)."""
    n, width = band.shape[:2]
    bottom = header.stored_height - y - n  # the band's first row, counted from the bottom
    o = header.orientation
    if o == 1:
        return Rect(0, y, width, n), band
    if o == 2:
        return Rect(0, y, width, n), band[:, ::-1]
    if o == 3:
        return Rect(0, bottom, width, n), band[::-1, ::-1]
    if o == 4:
        return Rect(0, bottom, width, n), band[::-1]
    turned = band.transpose(1, 0, 2)
    if o == 5:
        return Rect(y, 0, n, width), turned
    if o == 6:
        return Rect(bottom, 0, n, width), turned[:, ::-1]
    if o == 7:
        return Rect(bottom, 0, n, width), turned[::-1, ::-1]
    return Rect(y, 0, n, width), turned[::-1]  # 8


def image_tiles(data: Buffer, header: ImageHeader, mask: bool, canvas_id: int, edge: int) -> Iterator[tiles_pb2.Tile]:
    """The attachment's canvas as transport tiles, decoded a band at a time."""
    edge = transport_edge(edge, header.channels(mask))
    for y, band in decode_bands(data, header, mask, band_rows(header, mask, edge)):
        place, pixels = _orient(header, y, band)
        for rect in transport_grid(place.width, place.height, edge):
            region = np.ascontiguousarray(pixels[rect.slices])
            yield tiles_pb2.Tile(
                canvas_id=canvas_id, x=place.x + rect.x, y=place.y + rect.y,
                width=rect.width, height=rect.height, pixels=region.tobytes(),
            )


def decode_image(data: Buffer, mask: bool = False) -> np.ndarray:
    """The whole image as (H, W, C) uint8 by the rule: for callers that want it whole (the
    client, tests, benches), never for the gateway's attachments."""
    header = read_header(data)
    out = np.zeros((header.height, header.width, header.channels(mask)), np.uint8)
    for y, band in decode_bands(data, header, mask, band_rows(header, mask, 512)):
        place, pixels = _orient(header, y, band)
        out[place.slices] = pixels
    return out
