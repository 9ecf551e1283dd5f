"""ControlNet for the diffusion stages: the `control` params, the ControlNets from models.yaml
(`controlnets:`), the preprocessors that make a control image from a picture, and the diffusers
ControlNet pipelines (made with `from_pipe` from a loaded base model, so they share its UNet, VAE
and text encoders; several ControlNets run as diffusers' MultiControlNetModel).

A stage's control image is the one attached to it (role `control`) or, without one, made from
the stage's own input image. In tiled stages the control image is tiled with the image: each
processing tile gets the control tile under it (an attached control image must have the
image's size), so a big canvas is conditioned everywhere at full resolution."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .models import ModelEntry, ModelRegistry, hub_offline
from .params import Param, ParamError

# family -> task -> diffusers ControlNet pipeline class
CONTROL_PIPELINES: dict[str, dict[str, str]] = {
    "sd1": {"txt2img": "StableDiffusionControlNetPipeline", "img2img": "StableDiffusionControlNetImg2ImgPipeline", "inpaint": "StableDiffusionControlNetInpaintPipeline"},
    "sd2": {"txt2img": "StableDiffusionControlNetPipeline", "img2img": "StableDiffusionControlNetImg2ImgPipeline", "inpaint": "StableDiffusionControlNetInpaintPipeline"},
    "sdxl": {"txt2img": "StableDiffusionXLControlNetPipeline", "img2img": "StableDiffusionXLControlNetImg2ImgPipeline", "inpaint": "StableDiffusionXLControlNetInpaintPipeline"},
}
AUTO = "auto"


def control_params(default: dict[str, float] | None = None) -> tuple[Param, ...]:
    return (
        Param("control", dict, default or {}, "ControlNets from models.yaml with their weights (conditioning scale), e.g. "
              "{\"canny\": 1.0}; several run together (MultiControlNet). The control image is attached (role control) "
              "or made from the stage's input by the preprocessor."),
        Param("preprocessor", str, AUTO, "How the control image is made: 'auto' uses an attached control image as it "
              "is, else applies each ControlNet's own preprocessor (models.yaml) to the input image; or one for all: "
              "canny, soft-edge, none (the image itself), or a preprocessor model from models.yaml."),
        Param("control_start", float, 0.0, "Share of the denoising steps after which the ControlNets start guiding.", min=0.0, max=1.0),
        Param("control_end", float, 1.0, "Share of the denoising steps after which they stop.", min=0.0, max=1.0),
        Param("canny_low", int, 100, "Canny preprocessor: lower hysteresis threshold.", min=0, max=1000),
        Param("canny_high", int, 200, "Canny preprocessor: upper hysteresis threshold.", min=0, max=1000),
    )


# --- preprocessors: picture (H, W, 3) uint8 -> control image (H, W, 3) uint8 ------------------


def canny(pixels: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    """White edges on black (lllyasviel's canny ControlNets)."""
    import cv2

    gray = cv2.cvtColor(np.ascontiguousarray(pixels[:, :, :3]), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, p.get("canny_low", 100), p.get("canny_high", 200))
    return np.repeat(edges[:, :, None], 3, axis=2)


def soft_edge(pixels: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    """Soft edges (metafusion's soft-sobel, what the softedge/HED ControlNets read): the Sobel
    gradient magnitude of the lightly blurred grey image, on a fixed scale (not normalised per
    image, so that tiles of one canvas agree), softened again."""
    import cv2

    gray = cv2.cvtColor(np.ascontiguousarray(pixels[:, :, :3]), cv2.COLOR_RGB2GRAY).astype(np.float32) / 255.0
    gray = cv2.GaussianBlur(gray, (0, 0), 1.0, borderType=cv2.BORDER_REPLICATE)
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REPLICATE)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REPLICATE)
    magnitude = cv2.GaussianBlur(np.sqrt(gx * gx + gy * gy), (0, 0), 1.0, borderType=cv2.BORDER_REPLICATE)
    soft = np.clip(np.rint(magnitude * 2.0 * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(soft[:, :, None], 3, axis=2)


def unchanged(pixels: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    return np.ascontiguousarray(pixels[:, :, :3])


BUILTIN_PREPROCESSORS: dict[str, Callable[[np.ndarray, dict[str, Any]], np.ndarray]] = {
    "canny": canny,
    "soft-edge": soft_edge,
    "none": unchanged,
}


def check_preprocessor(registry: ModelRegistry, name: str, param: str) -> str:
    """name if it is a built-in preprocessor or one in models.yaml (preprocessors:), else ParamError."""
    if name in BUILTIN_PREPROCESSORS or name in registry.entries.get("preprocessors", {}):
        return name
    known = ", ".join([*BUILTIN_PREPROCESSORS, *registry.names("preprocessors")])
    raise ParamError(param, f"unknown preprocessor {name!r} (built in or in models.yaml preprocessors: {known})")


def preprocess(registry: ModelRegistry | None, name: str, pixels: np.ndarray, p: dict[str, Any]) -> np.ndarray:
    if name in BUILTIN_PREPROCESSORS:
        return BUILTIN_PREPROCESSORS[name](pixels, p)
    from .preprocessor_models import run_preprocessor

    assert registry is not None
    return run_preprocessor(registry.entries["preprocessors"][name], pixels)


# --- the ControlNets a stage uses ---------------------------------------------------------


@dataclass(frozen=True)
class ControlSpec:
    name: str
    entry: ModelEntry
    weight: float
    preprocessor: str   # what makes its control image from a picture ("none": the picture itself)


def check_controls(registry: ModelRegistry | None, control: dict[str, Any], family: str, model_name: str, task: str, preprocessor: str) -> list[ControlSpec]:
    """{name: weight} -> the ControlNets, or ParamError naming 'control' (or 'preprocessor')."""
    if registry is None:
        raise ParamError("control", "no model registry is configured")
    if family not in CONTROL_PIPELINES:
        raise ParamError("control", f"{model_name!r} is a {family} model; ControlNet runs on sd1, sd2 and sdxl models")
    if task not in CONTROL_PIPELINES[family]:
        raise ParamError("control", f"no ControlNet pipeline for {task} with {family} models")
    if preprocessor != AUTO:
        check_preprocessor(registry, preprocessor, "preprocessor")
    specs = []
    for name, weight in control.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 2.0:
            raise ParamError("control", f"weight of {name!r} must be a number from 0 to 2, got {weight!r}")
        try:
            entry = registry.resolve("controlnets", name, param="control")
        except ParamError as exc:
            raise ParamError("control", exc.message) from None
        own = str(entry.options.get("family", family))
        if own != family:  # SD 2's text encoder is wider than SD 1's: their ControlNets differ too
            raise ParamError("control", f"{name!r} is a ControlNet for {own} models, not for {model_name!r} ({family})")
        own_preprocessor = str(entry.options.get("preprocessor", "none"))
        try:
            check_preprocessor(registry, own_preprocessor, "control")
        except ParamError as exc:
            raise ParamError("control", f"{name!r} in models.yaml: {exc.message}") from None
        specs.append(ControlSpec(name, entry, float(weight), own_preprocessor))
    return specs


def control_images(registry: ModelRegistry | None, controls: Sequence[ControlSpec], picture: np.ndarray, attached: bool, p: dict[str, Any]) -> list[np.ndarray]:
    """One control image per ControlNet from the picture (a tile or a whole image): an attached
    control image as it is under 'auto', else through the preprocessor."""
    chosen = p.get("preprocessor", AUTO)
    images, made = [], {}
    for spec in controls:
        name = chosen if chosen != AUTO else ("none" if attached else spec.preprocessor)
        if name not in made:
            made[name] = preprocess(registry, name, picture, p)
        images.append(made[name])
    return images


def control_call(controls: Sequence[ControlSpec], images: list[np.ndarray], p: dict[str, Any]) -> dict[str, Any]:
    """The ControlNet arguments of a pipeline call (the images still arrays: the stage pads and
    converts them with the tile)."""
    return {
        "control_image": images,
        "controlnet_conditioning_scale": [spec.weight for spec in controls],
        "control_guidance_start": p.get("control_start", 0.0),
        "control_guidance_end": p.get("control_end", 1.0),
    }


def pipeline_arguments(task: str, controls: Sequence[ControlSpec], kwargs: dict[str, Any]) -> dict[str, Any]:
    """A stage's call as the ControlNet pipeline takes it: text-to-image pipelines take the
    control image as `image`; with one ControlNet, a single image and scale, not lists."""
    kwargs = dict(kwargs)
    images, scales = kwargs.pop("control_image"), kwargs["controlnet_conditioning_scale"]
    if len(controls) == 1:
        images, scales = images[0], scales[0]
    kwargs["image" if task == "txt2img" else "control_image"] = images
    kwargs["controlnet_conditioning_scale"] = scales
    return kwargs


def control_pipeline(base: Any, family: str, task: str, nets: list[Any]) -> Any:
    """The task's ControlNet pipeline sharing the base pipeline's components."""
    import diffusers

    cls = getattr(diffusers, CONTROL_PIPELINES[family][task])
    controlnet = nets[0] if len(nets) == 1 else diffusers.MultiControlNetModel(nets)
    return cls.from_pipe(base, controlnet=controlnet)


def load_controlnet(spec: ControlSpec, dtype: Any, device: Any) -> Any:
    """A ControlNetModel from a diffusers folder, a single file, or a hub id (only when
    downloads are allowed), or ParamError naming 'control'."""
    import diffusers

    entry = spec.entry
    try:
        if entry.path is not None and entry.path.is_file():
            net = diffusers.ControlNetModel.from_single_file(str(entry.path), dtype=dtype)
        else:
            source = str(entry.path) if entry.path is not None else entry.hub
            net = diffusers.ControlNetModel.from_pretrained(source, dtype=dtype, local_files_only=hub_offline())
    except Exception as exc:
        raise ParamError("control", f"{spec.name!r} ({entry.source}) does not load as a ControlNet: {type(exc).__name__}: {exc}") from None
    return net.to(device).eval()
