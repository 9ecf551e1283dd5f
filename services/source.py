"""Source stages: make new images (noise, an attached image, a diffusion model). A source stage replaces the
chain's images with its own; it reads an input image only where its params say so."""

from __future__ import annotations

import secrets

import numpy as np

from .core.controlnet import control_call, control_images, control_params
from .core.diffusion import DiffusionStage, count_param, generator, prompt_params, sampling_params
from .core.params import Param, ParamError
from .core.resample import resize
from .core.stage import CONTROL, IMAGE, RGB8, OutputPlan, Stage, TileWork, register
from tilechain.v1 import tiles_pb2


@register
class SourceNoise(Stage):
    type = "source-noise"
    family = "source"
    doc = (
        "Fill new images with noise: uniform, gaussian, or colours drawn from an input image's "
        "histogram (the chain's image, or one attached), as onnx-web fills outpainting borders."
    )
    params = (
        Param("width", int, 512, "Width of each image in pixels.", min=8, max=65536),
        Param("height", int, 512, "Height of each image in pixels.", min=8, max=65536),
        Param("method", str, "uniform", "Noise distribution.", choices=("uniform", "gaussian", "histogram")),
        Param("seed", int, -1, "Random seed; -1 picks one (recorded in the provenance). Image i uses seed + i.", min=-1, max=2**32 - 1),
        Param("count", int, 1, "Number of images.", min=1, max=16),
    )
    needs_whole_canvas = True
    max_tile = 0
    attachments = ("image",)
    size_params = ("width", "height")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.p["seed"] == -1:
            self.p["seed"] = secrets.randbelow(2**32 - 16)

    def plan(self, inputs: list[tiles_pb2.Canvas]) -> list[OutputPlan]:
        sample = self.attached(inputs, IMAGE) or next(iter(self.chain_images(inputs)), None)
        if self.p["method"] == "histogram" and sample is None:
            raise ParamError("method", "'histogram' needs an input image: place the stage after one or attach one")
        outputs = []
        for index in range(self.p["count"]):
            canvas = tiles_pb2.Canvas(width=self.p["width"], height=self.p["height"], format=RGB8, role=IMAGE, index=index)
            canvas.provenance.CopyFrom(self.provenance())
            sources = {"image": sample} if self.p["method"] == "histogram" else {}
            outputs.append(OutputPlan(canvas, sources))
        return outputs

    def process_canvas(self, output: OutputPlan, sources: dict[str, np.ndarray]) -> np.ndarray:
        return noise(self.p["method"], self.p["width"], self.p["height"], self.p["seed"] + output.canvas.index, sources.get("image"))


def noise(method: str, width: int, height: int, seed: int, sample: np.ndarray | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if method == "uniform":
        return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    if method == "gaussian":
        return np.clip(rng.normal(127.5, 48.0, (height, width, 3)), 0, 255).astype(np.uint8)
    assert sample is not None
    rgb = sample[:, :, :3] if sample.shape[2] >= 3 else np.repeat(sample, 3, axis=2)
    channels = []
    for c in range(3):
        counts = np.bincount(rgb[:, :, c].ravel(), minlength=256).astype(np.float64)
        channels.append(rng.choice(256, size=(height, width), p=counts / counts.sum()).astype(np.uint8))
    return np.stack(channels, axis=2)


@register
class SourceImage(Stage):
    type = "source-image"
    family = "source"
    doc = "Start from an image attached to the request under this stage's name."
    attachments = ("image",)
    required_attachments = ("image",)

    def plan(self, inputs: list[tiles_pb2.Canvas]) -> list[OutputPlan]:
        image = self.attached(inputs, IMAGE)
        canvas = tiles_pb2.Canvas(width=image.width, height=image.height, format=image.format, role=IMAGE, index=0)
        canvas.provenance.CopyFrom(self.provenance())
        return [OutputPlan(canvas, {"image": image})]

    def process_tile(self, work: TileWork) -> np.ndarray:
        return work.pixels()


@register
class SourceTxt2Img(DiffusionStage):
    type = "source-txt2img"
    family = "source"
    doc = (
        "Generate images from a prompt with a diffusion model (SD 1.x/2.x, SDXL, or any "
        "diffusers text-to-image pipeline). The whole image is one pipeline call; for images "
        "far beyond the model's native size, generate at native size and upscale, then refine "
        "with blend-img2img, which tiles. With control, ControlNets guide it: the control image "
        "is attached, or made from the chain's image (resized to width x height) by the preprocessor."
    )
    task = "txt2img"
    makes_latents = True
    params = (
        *prompt_params("sd15"),
        Param("width", int, 512, "Width in pixels, a multiple of 8.", min=64, max=4096),
        Param("height", int, 512, "Height in pixels, a multiple of 8.", min=64, max=4096),
        count_param("Images per request"),
        *sampling_params(),
        *control_params(),
    )
    needs_whole_canvas = True
    max_tile = 0
    attachments = ("control",)
    size_params = ("width", "height")

    def plan(self, inputs: list[tiles_pb2.Canvas]) -> list[OutputPlan]:
        self.adopt_chain_prompt(inputs)
        self.check_model()
        for side in ("width", "height"):
            if self.p[side] % 8:
                raise ParamError(side, f"{self.p[side]} is not a multiple of 8 (the VAE works in 8-pixel blocks)")
        sources = self.control_source(inputs)
        self.images: np.ndarray | None = None
        outputs = []
        for index in range(self.p["count"]):
            canvas = tiles_pb2.Canvas(width=self.p["width"], height=self.p["height"], format=RGB8, role=IMAGE, index=index)
            canvas.provenance.CopyFrom(self.provenance())
            outputs.append(OutputPlan(self.result_canvas(canvas), dict(sources)))
        return outputs

    def control_source(self, inputs: list[tiles_pb2.Canvas]) -> dict[str, tiles_pb2.Canvas]:
        """The picture the control images come from: the attached control image, else the
        chain's (first) image; a source stage reads its input only for this."""
        attached = self.attached(inputs, CONTROL)
        if not self.controls:
            if attached is not None:
                raise ParamError("control", "a control image is attached but the stage has no ControlNet: set control")
            return {}
        picture = attached or next(iter(self.chain_images(inputs)), None)
        if picture is None:
            raise ParamError("control", "needs a control image: attach one (role control) or place the stage after an image")
        return {"control": picture}

    def control_arguments(self, output: OutputPlan, sources: dict[str, np.ndarray]) -> dict:
        if not self.controls:
            return {}
        from .core.codecs import to_pil

        attached = output.sources["control"].attached
        picture = sources["control"][:, :, :3]
        if picture.shape[:2] != (self.p["height"], self.p["width"]):
            picture = resize(picture, self.p["width"], self.p["height"], "lanczos")
        call = control_call(self.controls, control_images(self.context.models, self.controls, picture, attached, self.p), self.p)
        call["control_image"] = [to_pil(image) for image in call["control_image"]]
        return call

    def jobs_with_steps(self, jobs: int) -> int:
        return 1  # one batched call makes every image

    def process_canvas(self, output: OutputPlan, sources: dict[str, np.ndarray]) -> np.ndarray:
        if self.images is None:  # all `count` images in one batched call, on the first output
            count, seed = self.p["count"], self.p["seed"]
            call = self.prompt_call() | self.control_arguments(output, sources) | {
                "width": self.p["width"],
                "height": self.p["height"],
                "num_images_per_prompt": count,
                "generator": [generator(seed + i) for i in range(count)],
            }
            self.images = self.run_pipeline(call)
        # some pipelines round the size up (Kandinsky: to multiples of 64); keep the asked size
        return self.images[output.canvas.index][: output.canvas.height, : output.canvas.width]
