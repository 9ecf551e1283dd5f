"""Edit stages: change what an image says or carries without reworking it: text drawn on it
(edit-text), its metadata (edit-metadata), the safety check (edit-safety). onnx-web's edit-*
stages; their own family, since the stage type's prefix names the family."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np

from tilechain.v1 import tiles_pb2

from .core.codecs import match_channels
from .core.drawing import TextLayer, colour, load_font, render_text
from .core.models import ModelCache, hub_offline
from .core.params import Param, ParamError, dict_to_struct, struct_to_dict
from .core.stage import RGB8, RGBA8, OutputPlan, PassThroughStage, Stage, StageError, TileWork, register


def image_format(image: tiles_pb2.Canvas) -> int:
    """Edit stages keep an alpha channel and make RGB of anything else."""
    return RGBA8 if image.format == RGBA8 else RGB8


@register
class EditText(Stage):
    type = "edit-text"
    family = "edit"
    doc = (
        "Draw text on each image (onnx-web's edit-text), with Pillow's own TrueType font or a system font; "
        "tiles stream through, each with the part of the text over it."
    )
    params = (
        Param("text", str, doc="The text; \\n starts a new line."),
        Param("position", list, [16, 16], "[x, y] of the anchor point in pixels; negative values count from the right and bottom edges."),
        Param("anchor", str, "la", "Which point of the text sits at position (Pillow's anchors: 'la' left/top, 'mm' centre, 'rd' right/bottom, ...)."),
        Param("size", int, 24, "Font size in pixels.", min=4, max=1024),
        Param("font", str, "", "A .ttf/.otf path or an installed font's file name; '' is the font that ships with Pillow (DejaVu Sans)."),
        Param("fill", str, "white", "Text colour (e.g. 'white', '#ffcc00', '#ffcc0080' with alpha)."),
        Param("stroke", str, "black", "Outline colour."),
        Param("stroke_width", int, 1, "Outline width in pixels; 0 for none.", min=0, max=64),
    )

    def plan(self, inputs: list[tiles_pb2.Canvas]) -> list[OutputPlan]:
        position = self.p["position"]
        if not (isinstance(position, list) and len(position) == 2 and all(isinstance(v, (int, float)) and float(v).is_integer() for v in position)):
            raise ParamError("position", f"must be [x, y] in whole pixels, got {position!r}")
        self.font = load_font(self.p["font"], self.p["size"])
        self.fill, self.stroke = colour(self.p["fill"], "fill"), colour(self.p["stroke"], "stroke")
        self.layers: dict[tuple[int, int], TextLayer] = {}
        outputs = super().plan(inputs)
        for output in outputs:
            self.layer(output.canvas)  # an anchor Pillow refuses fails here, before any tile
        return outputs

    def output_canvas(self, image: tiles_pb2.Canvas) -> tiles_pb2.Canvas:
        return self.derived(image, image.width, image.height, image_format(image))

    def layer(self, canvas: tiles_pb2.Canvas) -> TextLayer:
        size = (canvas.width, canvas.height)
        if size not in self.layers:
            x, y = (int(v) for v in self.p["position"])
            x, y = x if x >= 0 else canvas.width + x, y if y >= 0 else canvas.height + y
            self.layers[size] = render_text(
                self.p["text"], self.font, x, y, self.fill, self.p["anchor"], self.stroke, self.p["stroke_width"],
            )
        return self.layers[size]

    def process_tile(self, work: TileWork) -> np.ndarray:
        tile = match_channels(work.pixels(), 4 if work.output.format == RGBA8 else 3)
        return self.layer(work.output).over(tile, work.window)


@register
class EditMetadata(PassThroughStage):
    type = "edit-metadata"
    family = "edit"
    doc = (
        "Write a note, a prompt and other params into each image's metadata (onnx-web's edit-metadata): the "
        "provenance that persist stages store in the file. The prompt is also the one later diffusion stages with "
        "an empty prompt use. Pixels pass through."
    )
    params = (
        Param("note", str, "", "A note stored with the image."),
        Param("prompt", str, "", "The prompt to record (and to hand to later diffusion stages whose prompt is empty)."),
        Param("negative_prompt", str, "", "The negative prompt to record (and hand on), as prompt."),
        Param("params", dict, {}, "More key/value pairs for the metadata's params (onnx-web's size, upscale, highres, ...)."),
    )

    def provenance(self, source: tiles_pb2.Canvas | None = None) -> Any:
        data = struct_to_dict(super().provenance(source))
        for key in ("note", "prompt", "negative_prompt"):
            if self.p[key]:
                data[key] = self.p[key]
        if self.p["params"]:
            data["params"] = {**data.get("params", {}), **self.p["params"]}
        return dict_to_struct(data)


# --- the safety check ----------------------------------------------------------------------

SAFETY_MODELS = ModelCache(max_models=2)


def load_checker(entry: Any) -> tuple[Any, Any]:
    """diffusers' StableDiffusionSafetyChecker and its CLIP image processor from one folder (or a
    hub id, when downloads are allowed), on the service's device."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    from .core.torch_runtime import device

    source = str(entry.path) if entry.path is not None else entry.hub
    offline = hub_offline()

    def load() -> tuple[Any, Any]:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        try:
            checker = StableDiffusionSafetyChecker.from_pretrained(source, local_files_only=offline).to(device()).eval()
            processor = CLIPImageProcessor.from_pretrained(source, local_files_only=offline)
        except Exception as exc:
            raise ParamError("model", f"{entry.name!r} ({entry.source}) does not load as a safety checker: {type(exc).__name__}: {exc}") from None
        return checker, processor

    return SAFETY_MODELS.get((entry.source, str(device())), load)


def flagged(checker: Any, processor: Any, image: np.ndarray, adjustment: float) -> bool:
    """The checker's verdict, by its own rule (cosine similarity of the image's CLIP embedding to
    each concept embedding, minus the concept's threshold, plus 0.01 once a special-care concept
    matched), with diffusers' `adjustment` (fixed at 0 there) as a param."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    inputs = processor(images=[image], return_tensors="pt").pixel_values.to(checker.device, checker.dtype)
    with torch.inference_mode():
        embeds = checker.visual_projection(checker.vision_model(inputs)[1])
        special = cosine_distance(embeds, checker.special_care_embeds) - checker.special_care_embeds_weights + adjustment
        extra = 0.01 if bool((special > 0).any()) else 0.0
        concepts = cosine_distance(embeds, checker.concept_embeds) - checker.concept_embeds_weights + adjustment + extra
    return bool((concepts > 0).any())


@register
class EditSafety(Stage):
    type = "edit-safety"
    family = "edit"
    doc = (
        "Check each image with a safety checker (diffusers' StableDiffusionSafetyChecker, from models.yaml safety) "
        "and blur, drop (black) or stop at a flagged one; a notice says what was found. Whole canvas: the checker "
        "judges the whole image."
    )
    params = (
        Param("model", str, "safety-checker", "A safety checker named in models.yaml (safety), or a folder under the models root."),
        Param("action", str, "blur", "What happens to a flagged image: blur it, drop it (a black image in its place, as "
              "onnx-web does), or fail the job before it goes further.", choices=("blur", "drop", "fail")),
        Param("adjustment", float, 0.0, "Added to every concept score (diffusers' adjustment): higher flags more, "
              "at the cost of more benign images.", min=-1.0, max=2.0),
        Param("blur", int, 0, "Blur radius in pixels for action 'blur'; 0 is 1/16 of the image's longer side.", min=0, max=1024),
    )
    needs_whole_canvas = True
    max_tile = 0
    requires = ("torch", "diffusers", "transformers", "cv2")

    def plan(self, inputs: list[tiles_pb2.Canvas]) -> list[OutputPlan]:
        if self.context.models is None:
            raise ParamError("model", "no model registry is configured")
        self.entry = self.context.models.resolve("safety", self.p["model"])
        return super().plan(inputs)

    def output_canvas(self, image: tiles_pb2.Canvas) -> tiles_pb2.Canvas:
        return self.derived(image, image.width, image.height, RGB8)

    def process_canvas(self, output: OutputPlan, sources: dict[str, np.ndarray]) -> np.ndarray:
        image = match_channels(sources["image"], 3)
        checker, processor = load_checker(self.entry)
        index = output.canvas.index
        if not flagged(checker, processor, image, self.p["adjustment"]):
            self.context.notices.append(f"image {index}: passed the safety check")
            return image
        action = self.p["action"]
        if action == "fail":
            raise StageError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{self.label}: image {index} was flagged by the safety checker; the job stops here (action 'fail')",
            )
        self.context.notices.append(f"image {index}: flagged by the safety checker; {'blurred' if action == 'blur' else 'dropped (black)'}")
        if action == "drop":
            return np.zeros_like(image)
        import cv2

        radius = self.p["blur"] or max(image.shape[:2]) // 16
        return cv2.GaussianBlur(image, (0, 0), sigmaX=max(1, radius) / 2, borderType=cv2.BORDER_REPLICATE)
