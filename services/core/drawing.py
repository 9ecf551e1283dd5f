"""Text on images, shared by edit-text, blend-grid's labels and text-prompt's prompt card: fonts
(Pillow's own TrueType font or a system one), colours, and a text layer that tiles (each
processing tile composites the part of the layer over it, so a tiled run equals an untiled one)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFont

from .params import ParamError
from .tiles import Rect


def load_font(name: str, size: int, param: str = "font") -> Any:
    """'' is the TrueType font that ships with Pillow (DejaVu Sans, Pillow >= 10.1); otherwise a
    font file path or a font that FreeType finds in the system's font folders."""
    if not name:
        return ImageFont.load_default(size=size)
    try:
        return ImageFont.truetype(name, size)
    except OSError:
        raise ParamError(param, f"cannot open the font {name!r}: give a .ttf/.otf path or an installed font's file name, or '' for Pillow's own") from None


def colour(value: str, param: str) -> tuple[int, int, int, int]:
    """A CSS-style colour ('#rrggbb', '#rrggbbaa', 'white', 'rgb(1, 2, 3)') as RGBA."""
    try:
        rgba = ImageColor.getcolor(value, "RGBA")
    except ValueError:
        raise ParamError(param, f"{value!r} is not a colour (e.g. '#ffcc00', '#ffcc0080', 'white')") from None
    return tuple(rgba)  # type: ignore[return-value]


@dataclass
class TextLayer:
    """Rendered text: RGBA pixels placed at (x, y) on the canvas (which they may overhang)."""

    rect: Rect
    pixels: np.ndarray

    def over(self, tile: np.ndarray, window: Rect) -> np.ndarray:
        """The tile (window's pixels, RGB or RGBA uint8) with the layer composited over it."""
        inside = window.intersection(self.rect)
        if inside is None:
            return tile
        out = tile.copy()
        layer = self.pixels[inside.relative_to(self.rect).slices].astype(np.float32)
        target = out[inside.relative_to(window).slices]
        alpha = layer[:, :, 3:4] / 255.0
        target[:, :, :3] = np.clip(np.rint(target[:, :, :3] * (1.0 - alpha) + layer[:, :, :3] * alpha), 0, 255).astype(np.uint8)
        if target.shape[2] == 4:  # the image's own alpha: the text is opaque where it is
            target[:, :, 3] = np.maximum(target[:, :, 3], layer[:, :, 3].astype(np.uint8))
        return out


def render_text(
    text: str, font: Any, x: int, y: int, fill: tuple[int, ...], anchor: str = "la",
    stroke: tuple[int, ...] = (0, 0, 0, 0), stroke_width: int = 0, align: str = "left", param: str = "anchor",
) -> TextLayer:
    """The text at (x, y) by the anchor (Pillow's: 'la' is left/ascender, 'mm' the middle...)."""
    probe = ImageDraw.Draw(Image.new("RGBA", (1, 1)))
    try:
        left, top, right, bottom = probe.multiline_textbbox((x, y), text, font=font, anchor=anchor, stroke_width=stroke_width, align=align)
    except ValueError as exc:
        raise ParamError(param, f"{anchor!r}: {exc}") from None
    left, top = math.floor(left), math.floor(top)
    width, height = max(1, math.ceil(right) - left), max(1, math.ceil(bottom) - top)
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    ImageDraw.Draw(layer).multiline_text(
        (x - left, y - top), text, font=font, fill=fill, anchor=anchor, stroke_width=stroke_width, stroke_fill=stroke, align=align,
    )
    return TextLayer(Rect(left, top, width, height), np.asarray(layer))
