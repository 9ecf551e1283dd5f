"""Correct stages: face restoration. Faces are found (OpenCV's Haar cascade, or boxes given in
params), cropped square around each face and resized to the model's 512 x 512, restored by a
spandrel face model (GFPGAN; CodeFormer with the optional spandrel-extra-arches), resized back
and pasted with a feathered mask, blended with the original by `strength`."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from tilechain.v1 import tiles_pb2

from .core.codecs import match_channels
from .core.models import ModelRegistry
from .core.params import Param, ParamError
from .core.resample import resize
from .core.stage import RGB8, OutputPlan, Stage, register
from .core.tiles import Rect

FACE_SIZE = 512
CONTEXT = 0.35  # the crop extends this share of the face box's side beyond it on each side


def detect_faces(pixels: np.ndarray, cascade_file: str, min_face: int) -> list[Rect]:
    import cv2

    gray = cv2.cvtColor(np.ascontiguousarray(pixels[:, :, :3]), cv2.COLOR_RGB2GRAY)
    cascade = cv2.CascadeClassifier(cascade_file)
    if cascade.empty():
        raise ValueError(f"cannot read the cascade {cascade_file}")
    found = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_face, min_face))
    return [Rect(int(x), int(y), int(w), int(h)) for x, y, w, h in found]


def cascade_path(entry: Any) -> str:
    import cv2

    if "builtin" in entry.options:
        return cv2.data.haarcascades + entry.options["builtin"]
    return str(entry.path)


def face_crop(box: Rect, width: int, height: int) -> Rect:
    """A square around the face box with context, which may extend past the image."""
    side = math.ceil(max(box.width, box.height) * (1 + 2 * CONTEXT))
    cx, cy = box.x + box.width / 2, box.y + box.height / 2
    return Rect(round(cx - side / 2), round(cy - side / 2), side, side)


def cut_padded(pixels: np.ndarray, crop: Rect) -> np.ndarray:
    """The crop's pixels, edge-replicated where it extends past the image."""
    height, width = pixels.shape[:2]
    ys = np.clip(np.arange(crop.y, crop.y1), 0, height - 1)
    xs = np.clip(np.arange(crop.x, crop.x1), 0, width - 1)
    return pixels[ys][:, xs]


def paste_mask(side: int) -> np.ndarray:
    """1 in the middle, falling linearly to 0 over the outer 15% of the square."""
    feather = max(1.0, side * 0.15)
    ramp = np.minimum(np.arange(side) + 0.5, side - np.arange(side) - 0.5) / feather
    ramp = np.clip(ramp, 0.0, 1.0).astype(np.float32)
    return np.minimum(ramp[:, None], ramp[None, :])


class FaceRestore(Stage):
    family = "correct"
    requires = ("torch", "spandrel", "cv2")  # cv2: the Haar face detector
    needs_whole_canvas = True
    max_tile = 0
    size_params = ("upscale",)

    @staticmethod
    def face_params(default_model: str) -> tuple[Param, ...]:
        return (
            Param("model", str, default_model, "A face model named in models.yaml, or a file under the models root."),
            Param("strength", float, 1.0, "Blend of the restored face over the original (0 keeps the original).", min=0.0, max=1.0),
            Param("upscale", int, 1, "Enlarge the whole image by this factor (lanczos) before restoring faces, as onnx-web's face upscale.", min=1, max=4),
            Param("faces", list, [], "Face boxes [[x, y, width, height], ...] in input pixels; given, detection is skipped."),
            Param("detector", str, "haar-frontal", "A face detector named in models.yaml (detectors)."),
            Param("min_face", int, 48, "Smallest face the detector reports, in pixels.", min=16, max=4096),
        )

    architecture: ClassVar[str]  # the spandrel architecture id this stage runs

    @classmethod
    def preload(cls, models: ModelRegistry, name: str) -> bool:
        if name not in models.entries["faces"]:
            return False
        from .core.spandrel_models import load_descriptor

        model = load_descriptor(models, "faces", name, False, ("FaceSR",), cls.type)
        if model.architecture.id != cls.architecture:
            return False  # another face stage's model
        import cv2  # noqa: F401  (the face detector's, a second on a cold start)

        return True

    def plan(self, inputs: list[tiles_pb2.Canvas]) -> list[OutputPlan]:
        from .core.spandrel_models import load_descriptor

        self.model = load_descriptor(self.context.models, "faces", self.p["model"], False, ("FaceSR",), self.type)
        if self.model.architecture.id != self.architecture:
            raise ParamError("model", f"{self.p['model']!r} is a {self.model.architecture.name} model; {self.type} runs {self.architecture} models")
        self.detector = self.context.models.resolve("detectors", self.p["detector"], "detector")
        self.boxes = [self._box(i, face) for i, face in enumerate(self.p["faces"])]
        outputs = super().plan(inputs)
        for output in outputs:
            image = output.sources["image"]
            for box in self.boxes:
                if box.x1 > image.width or box.y1 > image.height:
                    raise ParamError("faces", f"box {[box.x, box.y, box.width, box.height]} reaches past the {image.width}x{image.height} image")
        return outputs

    @staticmethod
    def _box(number: int, face: Any) -> Rect:
        if not (isinstance(face, list) and len(face) == 4 and all(isinstance(v, (int, float)) and float(v).is_integer() and v >= 0 for v in face)):
            raise ParamError("faces", f"faces[{number}] must be [x, y, width, height] in whole pixels, got {face!r}")
        x, y, w, h = (int(v) for v in face)
        if w < 8 or h < 8:
            raise ParamError("faces", f"faces[{number}] is smaller than 8x8")
        return Rect(x, y, w, h)

    def output_canvas(self, image: tiles_pb2.Canvas) -> tiles_pb2.Canvas:
        return self.derived(image, image.width * self.p["upscale"], image.height * self.p["upscale"], RGB8)

    def process_canvas(self, output: OutputPlan, sources: dict[str, np.ndarray]) -> np.ndarray:
        image = match_channels(sources["image"], 3)
        factor = self.p["upscale"]
        if factor > 1:
            image = resize(image, image.shape[1] * factor, image.shape[0] * factor, "lanczos")
        if self.boxes:
            boxes = [Rect(b.x * factor, b.y * factor, b.width * factor, b.height * factor) for b in self.boxes]
        else:
            boxes = detect_faces(image, cascade_path(self.detector), self.p["min_face"] * factor)
        if not boxes:
            self.context.notices.append(f"image {output.canvas.index}: no face found; passed unchanged")
            return image
        result = image.astype(np.float32)
        for box in boxes:
            self.context.check_cancelled()
            self._restore(image, result, box)
        self.context.notices.append(f"image {output.canvas.index}: restored {len(boxes)} face(s)")
        return np.clip(np.rint(result), 0, 255).astype(np.uint8)

    def _restore(self, image: np.ndarray, result: np.ndarray, box: Rect) -> None:
        from .core.spandrel_models import model_lock
        from .core.torch_runtime import to_pixels, to_tensor

        height, width = image.shape[:2]
        crop = face_crop(box, width, height)
        face = resize(cut_padded(image, crop), FACE_SIZE, FACE_SIZE, "lanczos")
        tensor = to_tensor(face, self.model.dtype, self.model.device)
        with model_lock(self.model):
            output = self.run_model(tensor)
        restored = to_pixels(output)
        restored = resize(restored, crop.width, crop.height, "lanczos").astype(np.float32)
        weight = paste_mask(crop.width)[:, :, None] * self.p["strength"]
        inside = crop.intersection(Rect(0, 0, width, height))
        if inside is None:
            return
        local = inside.relative_to(crop)
        target = result[inside.slices]
        target[...] = target * (1 - weight[local.slices]) + restored[local.slices] * weight[local.slices]

    def run_model(self, tensor: Any) -> Any:
        return self.model(tensor)


@register
class CorrectGfpgan(FaceRestore):
    type = "correct-gfpgan"
    architecture = "GFPGAN"
    doc = "Restore faces with a GFPGAN model (spandrel)."
    params = FaceRestore.face_params("gfpgan")


@register
class CorrectCodeformer(FaceRestore):
    type = "correct-codeformer"
    architecture = "CodeFormer"
    doc = (
        "Restore faces with a CodeFormer model (needs the optional spandrel-extra-arches package, "
        "`pip install tilechain[codeformer]`, for its non-commercial licence)."
    )
    params = FaceRestore.face_params("codeformer") + (
        Param("fidelity", float, 0.5, "CodeFormer's weight: 0 favours quality, 1 fidelity to the input.", min=0.0, max=1.0),
    )

    def plan(self, inputs: list[tiles_pb2.Canvas]) -> list[OutputPlan]:
        from .core.spandrel_models import extra_arches_available

        if not extra_arches_available():
            raise ParamError("model", "CodeFormer needs the optional spandrel-extra-arches package (pip install 'tilechain[codeformer]')")
        return super().plan(inputs)

    def run_model(self, tensor: Any) -> Any:
        import torch

        with torch.inference_mode():
            return self.model.model(tensor, weight=self.p["fidelity"])[0]
