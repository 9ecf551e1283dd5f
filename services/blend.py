"""Blend stages: combine the chain's images with attached images and masks, or rework them
with a diffusion model (img2img, inpaint)."""

from __future__ import annotations

import numpy as np

from tilechain.v1 import tiles_pb2

from .core.codecs import channels, match_channels
from .core.controlnet import control_params
from .core.diffusion import DiffusionStage, count_param, mask_blur_param, prompt_params, sampling_params, strength_param, tile_params
from .core.params import Param, ParamError
from .core.stage import IMAGE, OutputPlan, Stage, TileWork, register


class _BlendStage(Stage):
    family = "blend"
    attachments = ("image",)
    required_attachments = ("image",)

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
