"""Blend stages: combine the chain's images with attached images and masks, or rework them
with a diffusion model (img2img, inpaint)."""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from tilechain.v1 import tiles_pb2

from .core.codecs import channels, match_channels
from .core.controlnet import control_params
from .core.diffusion import DiffusionStage, count_param, mask_blur_param, prompt_params, sampling_params, strength_param, tile_params
from .core.params import Param, ParamError
from .core.stage import IMAGE, RGB8, OutputPlan, Stage, TileWork, register
from .core.tiles import Rect


class _BlendStage(Stage):
    family = "blend"
    attachments = ("image",)
    required_attachments = ("image",)
    exact_tiles = True  # pixel by pixel

    def plan(self, inputs: list[tiles_pb2.Canvas]) -> list[OutputPlan]:
        other = self.attached(inputs, IMAGE)
        outputs = []
        for image in self.chain_images(inputs):
            self.require_same_size("image", "the attached image", other, image)
            outputs.append(OutputPlan(self.output_canvas(image), {"image": image, "other": other}))
        return outputs

    @staticmethod
    def operands(work: TileWork) -> tuple[np.ndarray, np.ndarray]:
        image = work.pixels("image").astype(np.float32)
        other = match_channels(work.pixels("other"), channels(work.output.format)).astype(np.float32)
        return image, other


@register
class BlendLinear(_BlendStage):
    type = "blend-linear"
    doc = "Mix each image with an attached image of the same size: (1 - alpha) * image + alpha * attached."
    params = (Param("alpha", float, 0.5, "Weight of the attached image.", min=0.0, max=1.0),)

    def process_tile(self, work: TileWork) -> np.ndarray:
        image, other = self.operands(work)
        return np.clip(np.rint(image + (other - image) * self.p["alpha"]), 0, 255).astype(np.uint8)


@register
class BlendMask(_BlendStage):
    type = "blend-mask"
    doc = (
        "Composite an attached image over each image through a mask: where the mask is white the "
        "attached image shows, where black the image stays. The mask is attached or comes from "
        "the previous stage."
    )
    attachments = ("image", "mask")

    def plan(self, inputs: list[tiles_pb2.Canvas]) -> list[OutputPlan]:
        mask = self.mask(inputs)
        outputs = super().plan(inputs)
        for output in outputs:
            self.require_same_size("mask", "the mask", mask, output.sources["image"])
            output.sources["mask"] = mask
        return outputs

    def process_tile(self, work: TileWork) -> np.ndarray:
        image, other = self.operands(work)
        weight = work.pixels("mask").astype(np.float32) / 255.0
        return np.clip(np.rint(image + (other - image) * weight), 0, 255).astype(np.uint8)


class _DiffusionBlend(DiffusionStage):
    """Image-to-image diffusion over the chain's images (or one attached image), in tiles."""

    family = "blend"
    attachments = ("image", "control")

    def images(self, inputs: list[tiles_pb2.Canvas]) -> list[tiles_pb2.Canvas]:
        images = self.chain_images(inputs) or [c for c in inputs if c.attached and c.role == IMAGE]
        if not images:
            raise ParamError("image", "needs an input image: place the stage after one or attach one")
        return images

    def plan(self, inputs: list[tiles_pb2.Canvas]) -> list[OutputPlan]:
        self.adopt_chain_prompt(inputs)
        self.check_model()
        if int(self.p["steps"] * self.p["strength"]) < 1:
            raise ParamError("strength", f"{self.p['strength']} x {self.p['steps']} steps runs no step; raise strength or steps")
        return self.with_control(self.variant_outputs(self.images(inputs)), inputs)


@register
class BlendImg2Img(_DiffusionBlend):
    type = "blend-img2img"
    doc = (
        "Refine each image with a diffusion model from a prompt (img2img; the SDXL refiner too). "
        "Images larger than the tile run as overlapping tiles in spiral order, feather-blended."
    )
    task = "img2img"
    makes_latents = takes_latents = True
    params = (*prompt_params("sd15"), strength_param(0.5), count_param(), *sampling_params(), *control_params(), *tile_params(64))

    def tile_call(self, work: TileWork) -> dict:
        return self.prompt_call() | {"strength": self.p["strength"]} | self.control_call(work)


@register
class BlendControlNet(BlendImg2Img):
    """onnx-web's blend-controlnet: the input image conditions a ControlNet (through its
    preprocessor), and the prompt is drawn anew along it; strength 1 by default, as onnx-web's
    ControlNet pipeline ignores its strength."""

    type = "blend-controlnet"
    doc = (
        "Redraw each image from a prompt, guided by ControlNets whose control image is made from it "
        "(or attached): onnx-web's blend-controlnet. Tiled like blend-img2img."
    )
    params = (
        *prompt_params("sd15"), strength_param(1.0), count_param(), *sampling_params(),
        *control_params({"canny": 1.0}), *tile_params(64),
    )

    def check_model(self) -> None:
        if not self.p["control"]:
            raise ParamError("control", "blend-controlnet needs at least one ControlNet, e.g. {\"canny\": 1.0}")
        super().check_model()


@register
class BlendPix2Pix(_DiffusionBlend):
    type = "blend-pix2pix"
    doc = (
        "Edit each image by an instruction with InstructPix2Pix (the prompt says what to change, e.g. "
        "'make it snow'); tiled like blend-img2img."
    )
    task = "pix2pix"
    params = (
        *prompt_params("sd15-pix2pix", steps=20, cfg=7.5),
        Param("image_guidance", float, 1.5, "How closely the result keeps to the input image (InstructPix2Pix's image "
              "guidance scale; 1 turns it off).", min=0.0, max=20.0),
        *(p for p in sampling_params() if p.name != "clip_skip"),  # its pipeline takes no clip_skip
        *tile_params(64),
    )
    attachments = ("image",)

    def plan(self, inputs: list[tiles_pb2.Canvas]) -> list[OutputPlan]:
        self.adopt_chain_prompt(inputs)
        self.check_model()
        return self.variant_outputs(self.images(inputs))

    def tile_call(self, work: TileWork) -> dict:
        return self.prompt_call() | {"image_guidance_scale": self.p["image_guidance"]}


@register
class BlendInpaint(_DiffusionBlend):
    type = "blend-inpaint"
    doc = (
        "Repaint the white area of a mask (attached, or from the previous stage) from a prompt: "
        "inpainting checkpoints (9-channel UNet) or, with an ordinary checkpoint, masked img2img. "
        "Tiles without any mask pass through untouched."
    )
    task = "inpaint"
    attachments = ("image", "mask", "control")
    params = (
        *prompt_params("sd15-inpaint"), strength_param(1.0), mask_blur_param(), count_param(), *sampling_params(),
        *control_params(), *tile_params(64),
    )

    def plan(self, inputs: list[tiles_pb2.Canvas]) -> list[OutputPlan]:
        outputs = super().plan(inputs)
        mask = self.mask(inputs)
        for output in outputs:
            self.require_same_size("mask", "the mask", mask, output.sources["image"])
            output.sources["mask"] = mask
        return outputs

    def process_tile(self, work: TileWork) -> np.ndarray:
        pixels, mask = work.pixels()[:, :, :3], work.pixels("mask")[:, :, 0]  # pixels: blend-inpaint takes no latents
        if not mask.any():
            return pixels.copy()
        call = self.prompt_call() | {"strength": self.p["strength"]} | self.control_call(work)
        return self.variant(work, lambda: self.inpaint(work.window, pixels, mask, call))


# --- grids and denoising ---------------------------------------------------------------------


@register
class BlendGrid(Stage):
    """onnx-web's blend-grid: the chain's images side by side in one image, `width` to a row and
    `height` rows (onnx-web's names), optionally in another order, with row and column labels and
    a title drawn in margins. Like onnx-web it passes the images on and adds the grid after them."""

    type = "blend-grid"
    family = "blend"
    doc = (
        "Lay the chain's images out in a grid (onnx-web's blend-grid): width images to a row, height rows, "
        "labels for rows and columns and a title in margins; the images pass on and the grid comes after them."
    )
    params = (
        Param("width", int, 0, "Images per row (onnx-web's name); 0 picks a near-square layout.", min=0, max=64),
        Param("height", int, 0, "Rows; 0 fits the images.", min=0, max=64),
        Param("order", list, [], "Image indices in grid order, e.g. [2, 0, 1]; [] keeps the chain's order."),
        Param("rows", list, [], "Row labels, drawn left of the rows."),
        Param("columns", list, [], "Column labels, drawn above the columns."),
        Param("title", str, "", "Drawn above everything."),
        Param("size", int, 24, "Label font size in pixels (Pillow's own TrueType font).", min=6, max=256),
        Param("keep_sources", bool, True, "Pass the images on before the grid (onnx-web's behaviour); false outputs the grid alone."),
    )
    needs_whole_canvas = True
    max_tile = 0
    size_params = ("width", "height")

    def plan(self, inputs: list[tiles_pb2.Canvas]) -> list[OutputPlan]:
        images = self.chain_images(inputs)
        if not images:
            raise ParamError("image", "needs the chain's images: place the stage after stages that make them")
        order = self.p["order"] or list(range(len(images)))
        for value in order:
            if not (isinstance(value, (int, float)) and float(value).is_integer() and 0 <= value < len(images)):
                shown = int(value) if isinstance(value, float) and value.is_integer() else repr(value)
                raise ParamError("order", f"{shown} is not an image index (0..{len(images) - 1})")
        self.order = [int(v) for v in order]
        first = images[0]
        for image in images[1:]:
            self.require_same_size("image", f"image {image.index}", image, first)
        count = len(self.order)
        columns = self.p["width"] or (self.p["height"] and -(-count // self.p["height"])) or math.ceil(math.sqrt(count))
        rows = self.p["height"] or -(-count // columns)
        if rows * columns < count:
            raise ParamError("height", f"{count} images do not fit {rows} row(s) of {columns}")
        for name in ("rows", "columns"):
            if not all(isinstance(label, str) for label in self.p[name]):
                raise ParamError(name, "labels must be strings")
        self.cells = (columns, rows)
        self.layout = self._layout(first.width, first.height)
        outputs = [OutputPlan(self.derived(image, image.width, image.height), {"image": image}) for image in images] if self.p["keep_sources"] else []
        width, height = self.layout["size"]
        grid = self.derived(first, width, height, RGB8)
        grid.index = len(images) if self.p["keep_sources"] else 0
        outputs.append(OutputPlan(grid, {f"cell{i}": images[n] for i, n in enumerate(self.order)}))
        return outputs

    def _layout(self, cell_w: int, cell_h: int) -> dict:
        """Where the labels go: a band for the title, one for the column labels, a column for the
        row labels, each as wide as its text."""
        from .core.drawing import load_font

        font = load_font("", self.p["size"])
        line = round(self.p["size"] * 1.5)
        left = max((round(font.getlength(label)) + self.p["size"] for label in self.p["rows"]), default=0)
        title = line if self.p["title"] else 0
        top = title + (line if self.p["columns"] else 0)
        columns, rows = self.cells
        return {"font": font, "left": left, "top": top, "title": title, "line": line, "cell": (cell_w, cell_h),
                "size": (left + columns * cell_w, top + rows * cell_h)}

    def process_canvas(self, output: OutputPlan, sources: dict[str, np.ndarray]) -> np.ndarray:
        if "image" in sources:  # a source image passing on
            return sources["image"]
        from .core.drawing import render_text

        layout = self.layout
        (cell_w, cell_h), (width, height) = layout["cell"], layout["size"]
        left, top, line, font = layout["left"], layout["top"], layout["line"], layout["font"]
        grid = np.zeros((height, width, 3), np.uint8)
        columns = self.cells[0]
        for i in range(len(self.order)):
            x, y = left + (i % columns) * cell_w, top + (i // columns) * cell_h
            grid[y : y + cell_h, x : x + cell_w] = match_channels(sources[f"cell{i}"], 3)
        white = (255, 255, 255, 255)
        labels = [(self.p["title"], width // 2, layout["title"] // 2)] if self.p["title"] else []
        labels += [(label, left + c * cell_w + cell_w // 2, layout["title"] + line // 2) for c, label in enumerate(self.p["columns"])]
        labels += [(label, left // 2, top + r * cell_h + cell_h // 2) for r, label in enumerate(self.p["rows"])]
        whole = Rect(0, 0, width, height)
        for text, x, y in labels:
            grid = render_text(text, font, x, y, white, "mm").over(grid, whole)
        return grid


class _Denoise(Stage):
    """A local denoising filter: each processing tile reads `halo` pixels around it, so tiles
    give exactly the untiled result."""

    family = "blend"
    requires = ("cv2",)
    halo: ClassVar[int] = 0
    exact_tiles = True

    def output_canvas(self, image: tiles_pb2.Canvas) -> tiles_pb2.Canvas:
        return self.derived(image, image.width, image.height, RGB8)

    def input_rect(self, window: Rect, name: str, source: tiles_pb2.Canvas, output: tiles_pb2.Canvas) -> Rect:
        return window.expand(self.halo, source.width, source.height)

    def process_tile(self, work: TileWork) -> np.ndarray:
        denoised = self.denoise(np.ascontiguousarray(match_channels(work.pixels(), 3)))
        return denoised[work.window.relative_to(work.rect()).slices]

    def denoise(self, pixels: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@register
class BlendDenoiseFastNlMeans(_Denoise):
    type = "blend-denoise-fastnlmeans"
    doc = "Remove noise with OpenCV's non-local means (fastNlMeansDenoisingColored), tile by tile with a halo."
    params = (Param("strength", int, 3, "Filter strength h (luminance and colour): higher removes more noise and more detail.", min=1, max=100),)
    halo = 7 // 2 + 21 // 2  # template window 7, search window 21: what a pixel's result reads

    def denoise(self, pixels: np.ndarray) -> np.ndarray:
        import cv2

        h = self.p["strength"]
        bgr = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
        return cv2.cvtColor(cv2.fastNlMeansDenoisingColored(bgr, None, h, h, 7, 21), cv2.COLOR_BGR2RGB)


@register
class BlendDenoise(BlendDenoiseFastNlMeans):
    type = "blend-denoise"
    doc = "onnx-web's blend-denoise: the same as blend-denoise-fastnlmeans."


@register
class BlendDenoiseLocalStd(_Denoise):
    """onnx-web's local-std denoiser, vectorised: a pixel that stands out from its
    neighbourhood (the window around it, itself left out) by more than `strength` plus
    `deviation` times the neighbourhood's standard deviation is a stray pixel and takes the
    window's median, per channel. A consistent neighbourhood exposes a stray pixel; in texture
    or along an edge the deviation is large and the pixel stays."""

    type = "blend-denoise-localstd"
    doc = (
        "Replace stray pixels (far from their neighbourhood's median compared with its standard deviation) with the "
        "median: onnx-web's local-std denoiser."
    )
    params = (
        Param("strength", int, 3, "Grey levels a pixel must stand out by, beyond the deviation, to count as stray.", min=0, max=255),
        Param("deviation", float, 3.0, "How many of the neighbourhood's standard deviations a stray pixel stands out by.", min=0.0, max=100.0),
        Param("window", int, 5, "Neighbourhood size in pixels (odd).", min=3, max=15),
    )

    def plan(self, inputs: list[tiles_pb2.Canvas]) -> list[OutputPlan]:
        if self.p["window"] % 2 == 0:
            raise ParamError("window", f"{self.p['window']} is even; the neighbourhood needs a centre pixel")
        self.halo = self.p["window"] // 2
        return super().plan(inputs)

    def denoise(self, pixels: np.ndarray) -> np.ndarray:
        import cv2

        size = self.p["window"]
        values = pixels.astype(np.float32)
        others = size * size - 1

        def window_sum(a: np.ndarray) -> np.ndarray:
            return cv2.boxFilter(a, -1, (size, size), normalize=False, borderType=cv2.BORDER_REPLICATE)
        mean = (window_sum(values) - values) / others
        variance = (window_sum(values * values) - values * values) / others - mean * mean
        spread = np.sqrt(np.maximum(variance, 0.0))
        median = cv2.medianBlur(pixels, size).astype(np.float32)
        stray = np.abs(values - median) > self.p["strength"] + self.p["deviation"] * spread
        return np.where(stray, median, values).astype(np.uint8)
