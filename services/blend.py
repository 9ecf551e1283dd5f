"""Blend stages: combine the chain's images with attached images and masks."""

from __future__ import annotations

import numpy as np

from tilechain.v1 import tiles_pb2

from .core.codecs import channels, match_channels
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
        if mask is None:
            raise ParamError("mask", "needs a mask: attach one to this stage or produce one in the previous stage")
        outputs = super().plan(inputs)
        for output in outputs:
            self.require_same_size("mask", "the mask", mask, output.sources["image"])
            output.sources["mask"] = mask
        return outputs

    def process_tile(self, work: TileWork) -> np.ndarray:
        image, other = self.operands(work)
        weight = work.pixels("mask").astype(np.float32) / 255.0
        return np.clip(np.rint(image + (other - image) * weight), 0, 255).astype(np.uint8)
