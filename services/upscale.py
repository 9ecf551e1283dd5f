"""Upscale stages: make images larger, by resampling or with super-resolution models."""

from __future__ import annotations

import grpc
import numpy as np

from tilechain.v1 import tiles_pb2

from .core.codecs import match_channels
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
        Param("scale", int, 2, "Factor applied to width and height.", min=2, max=8),
    )
    size_params = ("scale",)

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

    def plan(self, inputs: list[tiles_pb2.Canvas]) -> list[OutputPlan]:
        from .core.spandrel_models import load_descriptor

        model = load_descriptor(self.context.models, "upscalers", self.p["model"], self.p["half"], ("SR", "Restoration"), self.type)
        arch = model.architecture.id
        if self.architectures and arch not in self.architectures:
            raise ParamError("model", f"{self.p['model']!r} is a {arch} model; {self.type} takes {', '.join(self.architectures)} (upscale-spandrel takes any)")
        self.model = model
        self.scale = model.scale
        self.outscale = self.p["outscale"] or float(model.scale)
        minimum = model.size_requirements.minimum
        self.tile_in = self._auto_tile() if self.p["tile"] == "auto" else self.p["tile"]
        if self.tile_in < minimum:
            raise ParamError("tile", f"{self.tile_in} is smaller than the model's minimum of {minimum} pixels")
        if model.tiling.name == "INTERNAL":
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
        from .core.torch_runtime import to_pixels, to_tensor

        self.context.check_cancelled()
        return to_pixels(self.model(to_tensor(pixels, self.model.dtype, self.model.device)))


def auto_tile_for(model, free_bytes: int) -> int:
    """The largest tile (a multiple of 64, 64..2048) whose activations fit in 60% of free
    memory, from a probe of the model's memory per input pixel on a 64 x 64 input."""
    import torch

    from .core.torch_runtime import to_tensor

    dev = model.device
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    model(to_tensor(np.zeros((64, 64, model.input_channels), np.uint8), model.dtype, dev))
    per_pixel = max(1, torch.cuda.max_memory_allocated(dev) - base) / (64 * 64)
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
