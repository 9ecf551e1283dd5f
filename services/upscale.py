"""Upscale stages: make images larger, by resampling, with super-resolution models, with
diffusion upscalers, or by outpainting a border."""

from __future__ import annotations

import secrets
from typing import Any

import grpc
import numpy as np

from tilechain.v1 import tiles_pb2

from .core.codecs import image_size, match_channels
from .core.diffusion import DiffusionStage, mask_blur_param, prompt_params, sampling_params, strength_param, tile_params, tile_seed
from .core.models import ModelRegistry
from .core.params import Param, ParamError
from .core.resample import FILTERS, halo_for, resize_tile, resize_window, scaled_input_rect, source_rect
from .core.stage import RGB8, OutputPlan, Stage, StageError, TileWork, register
from .core.tiles import Rect


@register
class UpscaleSimple(Stage):
    type = "upscale-simple"
    family = "upscale"
    doc = "Enlarge each image by an integer factor with a classic resampling filter."
    params = (
        Param("method", str, "lanczos", "Resampling filter.", choices=FILTERS),
        Param("scale", int, 2, "Factor applied to width and height; 1 passes images through unchanged (as onnx-web's scale 1).", min=1, max=8),
    )
    size_params = ("scale",)
    exact_tiles = True  # each tile reads its filter's whole support: tiled equals untiled

    def output_canvas(self, image: tiles_pb2.Canvas) -> tiles_pb2.Canvas:
        return self.derived(image, image.width * self.p["scale"], image.height * self.p["scale"])

    def input_rect(self, window: Rect, name: str, source: tiles_pb2.Canvas, output: tiles_pb2.Canvas) -> Rect:
        return scaled_input_rect(window, source, output, self.p["method"])

    def process_tile(self, work: TileWork) -> np.ndarray:
        return resize_tile(work, self.p["method"])


def _model_params(default_model: str) -> tuple[Param, ...]:
    return (
        Param("model", str, default_model, "An upscaler named in models.yaml, or a .pth/.safetensors file under the models root."),
        Param("tile", int, "auto", "Input pixels per processing tile; 'auto' sizes it from free GPU memory (512 on the CPU).", min=8, max=4096, keywords=("auto",)),
        Param("overlap", int, 32, "Input pixels of context around each tile, also blended between neighbours.", min=0, max=256),
        Param("outscale", float, 0.0, "Final scale; 0 keeps the model's own, other values resize its output (lanczos).", min=0.0, max=16.0),
        Param("half", bool, True, "Run in fp16 or bf16 on CUDA where the model supports it."),
    )


class SpandrelUpscale(Stage):
    """A super-resolution model loaded by spandrel, run over processing tiles with context and
    feathered overlap, streaming: output tiles leave while input tiles still arrive."""

    family = "upscale"
    max_tile = 512
    overlap = 32
    size_params = ("outscale",)
    architectures: tuple[str, ...] = ()  # spandrel architecture ids this stage takes; () = any
    requires = ("torch", "spandrel")

    @classmethod
    def preload(cls, models: ModelRegistry, name: str) -> bool:
        if name not in models.entries["upscalers"]:
            return False
        from .core.spandrel_models import load_descriptor

        half = next(p.default for p in cls.params if p.name == "half")  # as a request with the default
        load_descriptor(models, "upscalers", name, half, ("SR", "Restoration"), cls.type)
        return True

    def load_model(self) -> Any:
        """The stage's model (a spandrel descriptor here), or ParamError naming 'model'."""
        from .core.spandrel_models import load_descriptor

        model = load_descriptor(self.context.models, "upscalers", self.p["model"], self.p["half"], ("SR", "Restoration"), self.type)
        arch = model.architecture.id
        if self.architectures and arch not in self.architectures:
            raise ParamError("model", f"{self.p['model']!r} is a {arch} model; {self.type} takes {', '.join(self.architectures)} (upscale-spandrel takes any)")
        return model

    def minimum_tile(self) -> int:
        return self.model.size_requirements.minimum

    def tiles_internally(self) -> bool:
        return self.model.tiling.name == "INTERNAL"

    def plan(self, inputs: list[tiles_pb2.Canvas]) -> list[OutputPlan]:
        model = self.model = self.load_model()
        self.scale = model.scale
        self.outscale = self.p["outscale"] or float(model.scale)
        minimum = self.minimum_tile()
        self.tile_in = self._auto_tile() if self.p["tile"] == "auto" else self.p["tile"]
        if self.tile_in < minimum:
            raise ParamError("tile", f"{self.tile_in} is smaller than the model's minimum of {minimum} pixels")
        if self.tiles_internally():
            self.tile_in = 0  # the model tiles internally: give it whole canvases
        self.context_px = self.p["overlap"]
        self.overlap = round(self.p["overlap"] * self.outscale)
        if self.tile_in and self.overlap >= self.tile_size():
            raise ParamError("overlap", f"{self.p['overlap']} must be smaller than the tile ({self.tile_in})")
        self.oom_tile = 0  # set when out-of-memory forced smaller sub-tiles
        return super().plan(inputs)

    def output_canvas(self, image: tiles_pb2.Canvas) -> tiles_pb2.Canvas:
        return self.derived(image, round(image.width * self.outscale), round(image.height * self.outscale), RGB8)

    def tile_size(self) -> int:
        return round(self.tile_in * self.outscale)

    def _auto_tile(self) -> int:
        from .core.torch_runtime import device, free_memory_bytes

        free = free_memory_bytes(device())
        if free is None:
            return 512
        return auto_tile_for(self.model, free)

    def input_rect(self, window: Rect, name: str, source: tiles_pb2.Canvas, output: tiles_pb2.Canvas) -> Rect:
        rect = source_rect(window, source.width, source.height, output.width, output.height)
        margin = self.context_px
        if self.outscale != self.scale:
            margin += -(-halo_for("lanczos", source.width * self.scale, output.width) // self.scale) + 1
        return rect.expand(margin, source.width, source.height)

    def process_tile(self, work: TileWork) -> np.ndarray:
        source, rect, s = work.source(), work.rect(), self.scale
        pixels = match_channels(work.pixels(), self.model.input_channels)
        upscaled = match_channels(self._upscale(pixels), 3)
        model_rect = Rect(rect.x * s, rect.y * s, rect.width * s, rect.height * s)
        if self.outscale == s:
            return upscaled[work.window.relative_to(model_rect).slices]
        return resize_window(
            upscaled, model_rect, work.window, source.width * s, source.height * s, work.output.width, work.output.height, "lanczos"
        )

    def _upscale(self, pixels: np.ndarray) -> np.ndarray:
        """The model over pixels; on out-of-memory, in sub-tiles half the size, down to 64."""
        from .core.torch_runtime import empty_cache, is_out_of_memory

        while True:
            try:
                return self._upscale_in_tiles(pixels, self.oom_tile)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                empty_cache(self.model.device)
                current = self.oom_tile or max(pixels.shape[:2])
                if current <= 64:
                    raise StageError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"stage '{self.name}' ({self.type}): param 'tile': out of memory even at 64 px tiles") from None
                self.oom_tile = max(64, current // 2)
                self.context.notices.append(f"out of memory: tile halved to {self.oom_tile} px and retried")

    def _upscale_in_tiles(self, pixels: np.ndarray, cap: int) -> np.ndarray:
        height, width = pixels.shape[:2]
        if not cap or (height <= cap and width <= cap):
            return self._forward(pixels)
        s = self.scale
        out = np.zeros((height * s, width * s, self.model.output_channels), dtype=np.uint8)
        for y in range(0, height, cap):
            for x in range(0, width, cap):
                core = Rect(x, y, min(cap, width - x), min(cap, height - y))
                padded = core.expand(self.context_px, width, height)
                result = self._forward(pixels[padded.slices])
                inner = core.relative_to(padded)
                out[core.y * s : core.y1 * s, core.x * s : core.x1 * s] = result[inner.y * s : inner.y1 * s, inner.x * s : inner.x1 * s]
        return out

    def _forward(self, pixels: np.ndarray) -> np.ndarray:
        from .core.spandrel_models import model_lock
        from .core.torch_runtime import to_pixels, to_tensor

        self.context.check_cancelled()
        tensor = to_tensor(pixels, self.model.dtype, self.model.device)
        with model_lock(self.model):
            result = self.model(tensor)
        return to_pixels(result)


PROBE = 64  # edge of the input auto_tile_for measures the model on


def auto_tile_for(model, free_bytes: int) -> int:
    """The largest tile (a multiple of 64, 64..2048) whose activations fit in 60% of free
    memory, from a probe of the model's memory per input pixel on a PROBE x PROBE input."""
    from .core.spandrel_models import model_lock
    from .core.torch_runtime import peak_bytes_of, to_tensor

    probe = to_tensor(np.zeros((PROBE, PROBE, model.input_channels), np.uint8), model.dtype, model.device)
    with model_lock(model):
        used = peak_bytes_of(lambda: model(probe), model.model, model.device)
    per_pixel = max(1, used) / (PROBE * PROBE)
    side = int((free_bytes * 0.6 / per_pixel) ** 0.5) // 64 * 64
    return max(64, min(2048, side))


@register
class UpscaleSpandrel(SpandrelUpscale):
    type = "upscale-spandrel"
    doc = "Any super-resolution or restoration model spandrel loads (ESRGAN, Real-ESRGAN, SwinIR, HAT, DAT, ...)."
    params = _model_params("esrgan-x4")


@register
class UpscaleResrgan(SpandrelUpscale):
    type = "upscale-resrgan"
    doc = "Real-ESRGAN / ESRGAN models (RRDBNet, and the Compact SRVGG nets)."
    params = _model_params("esrgan-x4")
    architectures = ("ESRGAN", "Compact")


@register
class UpscaleSwinir(SpandrelUpscale):
    type = "upscale-swinir"
    doc = "SwinIR models."
    params = _model_params("swinir-x2")
    architectures = ("SwinIR",)


@register
class UpscaleBsrgan(SpandrelUpscale):
    type = "upscale-bsrgan"
    doc = "BSRGAN models (an RRDBNet, which spandrel loads as ESRGAN)."
    params = _model_params("esrgan-x4")
    architectures = ("ESRGAN",)


@register
class UpscaleNcnn(SpandrelUpscale):
    """ncnn models (dgenerate's upscaler-ncnn): a .param graph with its .bin weights, run by ncnn
    on the CPU, or on a Vulkan GPU when asked and present. The same tiling as the spandrel
    upscalers (tile, overlap as context, outscale)."""

    type = "upscale-ncnn"
    doc = (
        "ncnn upscaling models (.param and .bin: Real-ESRGAN, realesr-animevideov3, upscayl's), run by "
        "ncnn on the CPU or, with vulkan, on a Vulkan GPU; tiled like the spandrel upscalers."
    )
    params = (
        *(p for p in _model_params("realesr-animevideov3-x4-ncnn") if p.name != "half"),
        Param("vulkan", bool, False, "Run on a Vulkan GPU where ncnn finds one (else the CPU). Off by default: "
              "ncnn's Vulkan allocator and torch's CUDA one should not share a GPU (docs/models.md)."),
    )

    requires = ("ncnn",)

    @classmethod
    def preload(cls, models: ModelRegistry, name: str) -> bool:
        return False  # an ncnn net loads in milliseconds: nothing to warm before SERVING

    def load_model(self) -> Any:
        from .core.ncnn_models import load_ncnn

        return load_ncnn(self.context.models, self.p["model"], self.p["vulkan"])

    def minimum_tile(self) -> int:
        return 1

    def tiles_internally(self) -> bool:
        return False

    def _auto_tile(self) -> int:
        return 512

    def _upscale(self, pixels: np.ndarray) -> np.ndarray:
        self.context.check_cancelled()
        return self.model(pixels)


# --- diffusion upscalers and outpainting -----------------------------------------------------


@register
class UpscaleStableDiffusion(DiffusionStage):
    type = "upscale-stable-diffusion"
    family = "upscale"
    doc = "x4 with the Stable Diffusion x4 upscaler, guided by a prompt; in overlapping tiles (128 input px by default)."
    task = "upscale-x4"
    scale = 4
    params = (
        *prompt_params("sd-x4-upscaler", steps=20, cfg=9.0),
        Param("noise_level", int, 20, "Noise added to the low-resolution input: more gives more invented detail.", min=0, max=350),
        Param("eta", float, 0.0, "DDIM eta.", min=0.0, max=1.0),
        *tile_params(16),
    )

    def tile_call(self, work: TileWork) -> dict:
        return self.prompt_call() | {"noise_level": self.p["noise_level"]}


@register
class UpscaleLatent(DiffusionStage):
    type = "upscale-latent"
    family = "upscale"
    doc = "x2 with the Stable Diffusion latent upscaler (for SD 1.x images), guided by a prompt; in overlapping tiles."
    task = "upscale-latent"
    makes_latents = takes_latents = True
    scale = 2
    overlap = 32
    params = (*prompt_params("sd-latent-x2", steps=20, cfg=0.0), *tile_params(16))
    minimum = 64  # its UNet pads the latent by a pixel at its lowest level: 8x8 latents at least
    pad_multiple = 32  # and halves it twice more

    def plan(self, inputs: list[tiles_pb2.Canvas]) -> list[OutputPlan]:
        for image in self.chain_images(inputs):
            width, height = image_size(image)
            if min(width, height) < self.minimum:
                raise ParamError("image", f"{width}x{height} is below the latent upscaler's minimum of {self.minimum}x{self.minimum}")
        return super().plan(inputs)

    def tile_call(self, work: TileWork) -> dict:
        return self.prompt_call()


@register
class UpscaleHighres(Stage):
    """onnx-web's highres fix, composed of the stages it is made of: per iteration, enlarge by
    `scale` (a resampling filter, as upscale-simple, or an upscaler model, as upscale-spandrel
    with outscale = scale), then refine at the new size with blend-img2img's tiled img2img.
    Both run through the tile engine in this process (core/compose.py), so they tile, blend and
    seed exactly as they do in a chain; iteration i uses seed + i."""

    type = "upscale-highres"
    family = "upscale"
    doc = (
        "Highres fix (onnx-web's upscale-highres): enlarge each image by scale with a filter or an upscaler "
        "model, then refine it at the new size with tiled img2img; iterations repeat both (scale ** iterations in all)."
    )
    params = (
        *prompt_params("sd15", steps=20),
        Param("scale", int, 2, "Enlargement per iteration.", min=2, max=4),
        Param("iterations", int, 1, "Upscale-and-refine rounds; the output is scale ** iterations times larger.", min=1, max=4),
        Param("method", str, "lanczos", "How to enlarge: a resampling filter, or 'upscale' for the upscaler model.",
              choices=("bilinear", "bicubic", "lanczos", "upscale")),
        Param("upscaler", str, "esrgan-x4", "The upscaler model (models.yaml upscalers) for method 'upscale'; its output "
              "is resized to the scale (e.g. realesrgan-x4 for real weights)."),
        strength_param(0.3),
        *sampling_params(),
        *tile_params(64),
    )
    needs_whole_canvas = True
    max_tile = 0
    size_params = ("scale",)
    requires = ("torch", "diffusers", "transformers", "cv2", "spandrel")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.p["seed"] == -1:
            self.p["seed"] = secrets.randbelow(2**32 - 8)

    def upscaler(self, context: Any) -> Stage:
        if self.p["method"] == "upscale":
            return UpscaleSpandrel.create(self.name, {"model": self.p["upscaler"], "outscale": float(self.p["scale"])}, context)
        return UpscaleSimple.create(self.name, {"method": self.p["method"], "scale": self.p["scale"]}, context)

    def refiner(self, context: Any, iteration: int) -> Stage:
        from .blend import BlendImg2Img

        keys = ("model", "prompt", "negative_prompt", "steps", "cfg", "strength", "scheduler", "clip_skip", "eta", "loras", "tile", "overlap")
        return BlendImg2Img.create(self.name, {k: self.p[k] for k in keys} | {"seed": self.p["seed"] + iteration}, context)

    def plan(self, inputs: list[tiles_pb2.Canvas]) -> list[OutputPlan]:
        from .core.compose import inner_context, plan_in_memory

        self.adopt_chain_prompt(inputs)
        outputs = []
        for image in self.chain_images(inputs):
            canvas = tiles_pb2.Canvas(width=image.width, height=image.height, format=RGB8, role=image.role, index=image.index)
            for iteration in range(self.p["iterations"]):  # checks every round's params and sizes now
                context = inner_context(self.context)
                try:
                    [canvas] = plan_in_memory(self.upscaler(context), [canvas])
                except ParamError as exc:
                    raise ParamError("upscaler" if exc.param == "model" else exc.param, exc.message) from None
                [canvas] = plan_in_memory(self.refiner(context, iteration), [canvas])
            outputs.append(OutputPlan(self.derived(image, canvas.width, canvas.height, RGB8), {"image": image}))
        return outputs

    def process_canvas(self, output: OutputPlan, sources: dict[str, np.ndarray]) -> np.ndarray:
        from .core.compose import Image, inner_context, run_in_memory

        source = output.sources["image"]
        image = Image(tiles_pb2.Canvas(width=source.width, height=source.height, format=RGB8, role=source.role), match_channels(sources["image"], 3))
        rounds, report = self.p["iterations"], self.context.on_step

        for iteration in range(rounds):
            context = inner_context(self.context)
            [image] = run_in_memory(self.upscaler(context), [image])
            image.canvas.id = 0

            def on_step(done: int, total: int, iteration: int = iteration) -> None:
                if report is not None:  # steps over all the rounds
                    report(iteration * total + done, rounds * total)
            [image] = run_in_memory(self.refiner(context, iteration), [image], on_step)
            image.canvas.id = 0
        return image.pixels


def parse_colour(value: str) -> tuple[int, int, int]:
    text = value.lstrip("#")
    if len(text) != 6 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise ParamError("colour", f"{value!r} is not a colour like '#7f7f7f'")
    return int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16)


@register
class UpscaleOutpaint(DiffusionStage):
    type = "upscale-outpaint"
    family = "upscale"
    doc = (
        "Extend each image by a border (one for all sides, or per side), fill it with noise or "
        "a colour, and inpaint it from a prompt. Tiles inside the original pass through."
    )
    task = "inpaint"
    params = (
        *prompt_params("sd15-inpaint"),
        Param("border", int, 0, "Pixels added on every side not given its own value.", min=0, max=4096),
        Param("left", int, -1, "Pixels added on the left; -1 uses border.", min=-1, max=4096),
        Param("right", int, -1, "Pixels added on the right; -1 uses border.", min=-1, max=4096),
        Param("top", int, -1, "Pixels added at the top; -1 uses border.", min=-1, max=4096),
        Param("bottom", int, -1, "Pixels added at the bottom; -1 uses border.", min=-1, max=4096),
        Param("fill", str, "noise", "What the new area starts as before inpainting.", choices=("noise", "colour")),
        Param("colour", str, "#7f7f7f", "The fill colour for fill='colour'."),
        strength_param(1.0),
        mask_blur_param(8),
        *sampling_params(),
        *tile_params(64),
    )
    size_params = ("border",)

    def plan(self, inputs: list[tiles_pb2.Canvas]) -> list[OutputPlan]:
        self.sides = {side: self.p[side] if self.p[side] >= 0 else self.p["border"] for side in ("left", "right", "top", "bottom")}
        if not any(self.sides.values()):
            raise ParamError("border", "no border to outpaint: set border or left/right/top/bottom")
        self.fill_colour = parse_colour(self.p["colour"])
        return super().plan(inputs)

    def output_canvas(self, image: tiles_pb2.Canvas) -> tiles_pb2.Canvas:
        s = self.sides
        return self.derived(image, image.width + s["left"] + s["right"], image.height + s["top"] + s["bottom"], RGB8)

    def original(self, source: tiles_pb2.Canvas) -> Rect:
        """Where the input image lies on the output canvas."""
        return Rect(self.sides["left"], self.sides["top"], source.width, source.height)

    def input_rect(self, window: Rect, name: str, source: tiles_pb2.Canvas, output: tiles_pb2.Canvas) -> Rect:
        inside = window.intersection(self.original(source))
        if inside is None:  # all border: read one pixel, the engine needs a rect
            return Rect(min(max(window.x - self.sides["left"], 0), source.width - 1), min(max(window.y - self.sides["top"], 0), source.height - 1), 1, 1)
        return Rect(inside.x - self.sides["left"], inside.y - self.sides["top"], inside.width, inside.height)

    def process_tile(self, work: TileWork) -> np.ndarray:
        window = work.window
        if self.p["fill"] == "noise":
            rng = np.random.default_rng(tile_seed(self.p["seed"], window))
            pixels = rng.integers(0, 256, (window.height, window.width, 3), dtype=np.uint8)
        else:
            pixels = np.empty((window.height, window.width, 3), np.uint8)
            pixels[:] = self.fill_colour
        mask = np.full((window.height, window.width), 255, np.uint8)
        inside = window.intersection(self.original(work.source()))
        if inside is not None:
            pixels[inside.relative_to(window).slices] = work.pixels()[:, :, :3]
            mask[inside.relative_to(window).slices] = 0
        if not mask.any():
            return pixels
        return self.inpaint(window, pixels, mask, self.prompt_call() | {"strength": self.p["strength"]})[0]
