"""Diffusion on diffusers, shared by the source, blend and upscale services.

Three parts:
- `BaseModel`: a models.yaml `base` entry and what its family can do (which diffusers pipeline
  class runs which task).
- `DiffusionRuntime`: the loaded pipelines, cached per (model, device, dtype). The img2img and
  inpaint pipelines of a model are made with `from_pipe`, so they share its UNet, VAE and text
  encoders. A call holds the model's lock while it sets the scheduler and LoRAs, because those
  live on the shared components.
- `DiffusionStage`: the stage base class. Canvases larger than the tile are processed as
  overlapping pixel tiles in spiral order that the engine blends with feathered weights (the
  onnx-web way; docs/diffusion.md says why this rather than latent averaging). Stages on
  one VAE can hand each other latents instead of pixels (`latent_space`, and the gateway's
  latent handoff), skipping a decode and an encode.

Torch and diffusers are imported lazily, so that services without models start fast."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

from .controlnet import ControlSpec, check_controls, control_call, control_images, control_pipeline, load_controlnet, pipeline_arguments
from .models import ModelCache, ModelEntry, ModelRegistry
from .params import Param, ParamError
from .codecs import LATENT_F32, image_size, is_latent
from .stage import CONTROL, RGB8, SERVICE_COUNTERS, Cancelled, Context, OutputPlan, Stage, TileWork
from .tiles import Rect
from tilechain.v1 import tiles_pb2

# family -> task -> diffusers pipeline class. The first task's class loads the model; the
# others are made from it with from_pipe. "auto" leaves the choice to diffusers' AutoPipeline
# classes, for families without an entry here (Kandinsky, PixArt, ...): those work on pixels.
_SD = {"txt2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline", "inpaint": "StableDiffusionInpaintPipeline"}
_SDXL = {"txt2img": "StableDiffusionXLPipeline", "img2img": "StableDiffusionXLImg2ImgPipeline", "inpaint": "StableDiffusionXLInpaintPipeline"}
PIPELINES: dict[str, dict[str, str]] = {
    "sd1": _SD,
    "sd2": _SD,
    "sdxl": _SDXL,
    "sdxl-refiner": {"img2img": _SDXL["img2img"], "inpaint": _SDXL["inpaint"]},
    "sd-x4-upscaler": {"upscale-x4": "StableDiffusionUpscalePipeline"},
    "sd-latent-upscaler": {"upscale-latent": "StableDiffusionLatentUpscalePipeline"},
    "sd1-pix2pix": {"pix2pix": "StableDiffusionInstructPix2PixPipeline"},
    "sdxl-pix2pix": {"pix2pix": "StableDiffusionXLInstructPix2PixPipeline"},
    "auto": {"txt2img": "AutoPipelineForText2Image", "img2img": "AutoPipelineForImage2Image", "inpaint": "AutoPipelineForInpainting"},
}
TASK_WORDS = {"txt2img": "text-to-image", "img2img": "image-to-image", "inpaint": "inpainting",
              "upscale-x4": "x4 upscaling", "upscale-latent": "latent x2 upscaling", "pix2pix": "instruction editing"}


@dataclass(frozen=True)
class BaseModel:
    """A diffusion model from models.yaml and what it can run."""

    entry: ModelEntry
    family: str
    inpaint_checkpoint: bool   # a 9-channel inpainting UNet: inpainting only
    native: int                # the pixel size it was trained at: the default tile
    scheduler: str             # default scheduler class name, "" = the model's own
    dtype: str                 # "auto" (fp16 on CUDA, fp32 on the CPU), "float16", "bfloat16", "float32"

    @property
    def tasks(self) -> dict[str, str]:
        tasks = PIPELINES[self.family]
        if self.inpaint_checkpoint:
            return {"inpaint": tasks["inpaint"]}
        return tasks

    @property
    def name(self) -> str:
        return self.entry.name


def resolve_model(registry: ModelRegistry | None, name: str, task: str, stage_type: str) -> BaseModel:
    """The base model for a stage, or ParamError('model') when it is unknown or cannot run
    the stage's task."""
    if registry is None:
        raise ParamError("model", "no model registry is configured")
    entry = registry.resolve("base", name)
    options = entry.options
    family = str(options.get("family", "sd1"))
    if family not in PIPELINES:
        raise ParamError("model", f"{name!r} has family {family!r} in models.yaml; known: {', '.join(PIPELINES)}")
    model = BaseModel(
        entry=entry,
        family=family,
        inpaint_checkpoint=bool(options.get("inpaint", False)),
        native=int(options.get("native", 1024 if family.startswith("sdxl") else 512)),
        scheduler=str(options.get("scheduler", "")),
        dtype=str(options.get("dtype", "auto")),
    )
    if task == "inpaint" and family == "auto" and not model.inpaint_checkpoint and pipeline_class_name(entry).startswith("Kandinsky"):
        raise ParamError("model", f"{name!r} is a Kandinsky text-to-image model; Kandinsky inpaints with its own decoder (a 9-channel UNet): name one with inpaint: true in models.yaml")
    if task not in model.tasks:
        kind = "an inpainting checkpoint" if model.inpaint_checkpoint else f"a {family} model"
        can = ", ".join(TASK_WORDS[t] for t in model.tasks)
        raise ParamError("model", f"{name!r} is {kind} ({can}); {stage_type} needs {TASK_WORDS[task]}")
    return model


# Families whose pipelines take and return latents of their VAE (output_type="latent", and
# 4-channel `image` input). Others ("auto": Kandinsky's MoVQ, ...) hand over pixels.
LATENT_FAMILIES = ("sd1", "sd2", "sdxl", "sdxl-refiner", "sd-latent-upscaler")
VAE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin")


def latent_space(model: BaseModel) -> tiles_pb2.Latent | None:
    """The model's latent space, or None when it hands over pixels only. Two models share a
    space when models.yaml gives them the same `latent_space`, or when their VAE folders hold
    the same config and weights (a digest of them); a single-file or hub model without a
    declared space shares only with itself."""
    if model.family not in LATENT_FAMILIES:
        return None
    path = model.entry.path
    vae = path / "vae" if path is not None and path.is_dir() else None
    channels, scale, digest = 4, 8, ""
    if vae is not None and (vae / "config.json").is_file():
        config = json.loads((vae / "config.json").read_text())
        channels = int(config.get("latent_channels", 4))
        scale = 2 ** (len(config.get("block_out_channels", [0] * 4)) - 1)
        digest = _vae_digest(vae, *_file_keys(vae))
    declared = model.entry.options.get("latent_space")
    space = str(declared) if declared else f"vae:{digest}" if digest else f"model:{model.entry.source}"
    return tiles_pb2.Latent(space=space, channels=channels, scale=scale)


def _file_keys(vae: Path) -> tuple[tuple[str, int, int], ...]:
    files = [vae / "config.json"] + [vae / name for name in VAE_WEIGHTS if (vae / name).is_file()]
    return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)


@functools.lru_cache(maxsize=64)
def _vae_digest(vae: Path, *files: tuple[str, int, int]) -> str:
    """sha256 of the VAE's config (less diffusers' bookkeeping keys) and weights; cached per
    file size and mtime, so a real VAE (~300 MB) is read once per service."""
    digest = hashlib.sha256()
    config = {k: v for k, v in json.loads((vae / "config.json").read_text()).items() if not k.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True).encode())
    for name, _, _ in files[1:]:
        with open(name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def pipeline_class_name(entry: ModelEntry) -> str:
    """The pipeline class a local diffusers folder was saved from, "" if unknown."""
    index = entry.path / "model_index.json" if entry.path is not None else None
    if index is None or not index.is_file():
        return ""
    return str(json.loads(index.read_text()).get("_class_name", ""))


# Short scheduler names: onnx-web's (its pipeline_schedulers) and the usual ones, each a
# diffusers class. A scheduler param (and models.yaml's `scheduler`) takes these or a class name.
SCHEDULERS: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "deis": "DEISMultistepScheduler",
    "deis-multi": "DEISMultistepScheduler",
    "dpm-multi": "DPMSolverMultistepScheduler",
    "dpm-sde": "DPMSolverSDEScheduler",  # needs the torchsde package
    "dpm-single": "DPMSolverSinglestepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "ipndm": "IPNDMScheduler",
    "k-dpm-2": "KDPM2DiscreteScheduler",
    "k-dpm-2-a": "KDPM2AncestralDiscreteScheduler",
    "lcm": "LCMScheduler",
    "lms": "LMSDiscreteScheduler",
    "lms-discrete": "LMSDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "tcd": "TCDScheduler",
    "unipc": "UniPCMultistepScheduler",
    "unipc-multi": "UniPCMultistepScheduler",
}


def scheduler_class(name: str) -> type:
    """A diffusers scheduler class by short name (SCHEDULERS) or class name, or
    ParamError('scheduler')."""
    import diffusers
    from diffusers import SchedulerMixin

    class_name = SCHEDULERS.get(name.strip().lower(), name)
    cls = getattr(diffusers, class_name, None)
    if isinstance(cls, type) and not issubclass(cls, SchedulerMixin) and class_name.endswith("Scheduler"):
        # diffusers' placeholder for a scheduler whose own dependency is missing
        from .stage import module_installed

        missing = ", ".join(b for b in getattr(cls, "_backends", ()) if not module_installed(b)) or "a package"
        raise ParamError("scheduler", f"{name!r} ({class_name}) needs {missing}, which is not installed")
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ParamError("scheduler", f"{name!r} is not a diffusers scheduler; short names: {', '.join(SCHEDULERS)}; or a class name such as DDIMScheduler")
    return cls


def model_scheduler_name(model: BaseModel) -> str:
    """The scheduler the model ships with, from models.yaml or its folder's config."""
    if model.scheduler:
        return model.scheduler
    if model.entry.path is not None and model.entry.path.is_dir():
        config = model.entry.path / "scheduler" / "scheduler_config.json"
        if config.is_file():
            return str(json.loads(config.read_text()).get("_class_name", ""))
    return ""


def scheduler_has_eta(cls: type) -> bool:
    return "eta" in inspect.signature(cls.step).parameters


def check_loras(registry: ModelRegistry, loras: dict[str, Any], model: BaseModel) -> dict[str, tuple[ModelEntry, float]]:
    """{name: weight} -> {name: (entry, weight)}, or ParamError('loras')."""
    resolved = {}
    for name, weight in loras.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not -4.0 <= weight <= 4.0:
            raise ParamError("loras", f"weight of {name!r} must be a number from -4 to 4, got {weight!r}")
        try:
            entry = registry.resolve("loras", name, param="loras")
        except ParamError as exc:
            raise ParamError("loras", exc.message) from None
        base = entry.options.get("base")
        if base and base in registry.entries["base"]:
            base_family = registry.entries["base"][base].options.get("family", "sd1")
            if base_family != model.family:
                raise ParamError("loras", f"{name!r} is for {base} ({base_family}), not for a {model.family} model")
        resolved[name] = (entry, float(weight))
    return resolved


# --- loaded pipelines ---------------------------------------------------------------------


@dataclass
class LoadedModel:
    """One model on one device: its pipelines by task, sharing components."""

    model: BaseModel
    pipes: dict[str, Any]
    scheduler_config: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    loras: set[str] = field(default_factory=set)   # adapters loaded into the components
    queue: dict[tuple, list[_Request]] = field(default_factory=dict)  # text-to-image calls waiting, by batch key


def _torch_dtype(model: BaseModel) -> Any:
    import torch

    from .torch_runtime import device

    if model.dtype != "auto":
        return getattr(torch, model.dtype)
    return torch.float16 if device().type == "cuda" else torch.float32


def _adapter_name(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


# call arguments that differ per image inside one batch
PER_IMAGE = ("prompt", "negative_prompt", "generator", "num_images_per_prompt", "image", "mask_image")
# tasks whose pipelines take lists of prompts, images and generators (the upscalers do not all)
BATCHED_TASKS = ("txt2img", "img2img", "inpaint")


def num_images(call: dict[str, Any]) -> int:
    return int(call.get("num_images_per_prompt", 1))


def merge_calls(calls: list[dict[str, Any]]) -> dict[str, Any]:
    """The per-image arguments of several calls as one batched call's: each call's prompt,
    negative prompt, image and mask repeated for each of its images, generators in order."""
    merged: dict[str, list[Any]] = {"prompt": [], "negative_prompt": [], "generator": []}
    for name in ("image", "mask_image"):
        if name in calls[0]:
            merged[name] = []
    for call in calls:
        count = num_images(call)
        merged["prompt"] += [call["prompt"]] * count
        merged["negative_prompt"] += [call.get("negative_prompt") or ""] * count
        merged["generator"] += call["generator"]
        for name in ("image", "mask_image"):
            if name in merged:
                merged[name] += [call[name]] * count
    out: dict[str, Any] = {**merged, "num_images_per_prompt": 1}
    if not any(merged["negative_prompt"]):
        out["negative_prompt"] = None  # as each call alone: SDXL zeroes a missing one but encodes ""
    if "image" in merged and _is_tensor(merged["image"][0]):
        import torch

        out["image"] = torch.cat(merged["image"])  # latents: one (N, C, h, w) batch
    return out


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.startswith("torch")


def _shape(value: Any) -> Any:
    """What must match for images to share a batch: PIL size and mode, or tensor shape."""
    if _is_tensor(value):
        return ("tensor", tuple(value.shape))
    return ("pil", value.size, value.mode)


def batch_key(task: str, scheduler: str, loras: Any, call: dict[str, Any]) -> tuple:
    """Calls with equal keys can run as one batch: the same everything but the per-image
    arguments, and images of one shape."""
    shared = {k: v for k, v in call.items() if k not in PER_IMAGE}
    shapes = tuple(_shape(call[name]) for name in ("image", "mask_image") if name in call)
    # with or without a negative prompt: a missing one and "" differ for some pipelines (SDXL)
    return (task, scheduler, _freeze(loras or {}), _freeze(shared), shapes, bool(call.get("negative_prompt")))


def _freeze(value: Any) -> Any:
    """A hashable, comparable form of call arguments (for the batch key)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, (str, int, float, bool, type(None))):
        return value
    return repr(value)


@dataclass
class _Request:
    """One stage's pipeline call, waiting for or taking part in a batch."""

    call: dict[str, Any]
    context: Context
    count: int
    finished: bool = False
    result: np.ndarray | None = None
    error: BaseException | None = None

    def outcome(self) -> np.ndarray:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class DiffusionRuntime:
    """Loads pipelines once, runs them with per-call scheduler, LoRAs and progress, and
    batches compatible text-to-image calls across requests."""

    def __init__(self, max_models: int | None = None) -> None:
        self.cache = ModelCache(max_models or int(os.environ.get("TILECHAIN_MAX_DIFFUSION_MODELS", "2")))
        self.batch_window = float(os.environ.get("TILECHAIN_BATCH_WINDOW_MS", "0")) / 1000.0
        self._queue_lock = threading.Lock()

    def load(self, model: BaseModel) -> LoadedModel:
        from .torch_runtime import device

        dev = device()
        dtype = _torch_dtype(model)
        key = ("diffusion", model.entry.source, str(dev), str(dtype))
        return self.cache.get(key, lambda: self._load(model, dev, dtype))

    def _load(self, model: BaseModel, dev: Any, dtype: Any) -> LoadedModel:
        import diffusers
        import transformers

        # the services log their own progress; the libraries' bars and notes would flood the logs
        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()

        first_task = next(iter(model.tasks))
        cls = getattr(diffusers, model.tasks[first_task])
        kwargs: dict[str, Any] = {"torch_dtype": dtype}
        if model.family in ("sd1", "sd2", "sd1-pix2pix"):
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        entry = model.entry
        try:
            if entry.path is not None and entry.path.is_file():
                pipe = cls.from_single_file(str(entry.path), **kwargs)
            else:
                source = str(entry.path) if entry.path is not None else entry.hub
                offline = os.environ.get("TILECHAIN_ALLOW_DOWNLOADS", "") != "1"
                pipe = cls.from_pretrained(source, local_files_only=offline, **kwargs)
        except Exception as exc:
            raise ParamError("model", f"{model.name!r} ({entry.source}) does not load as {cls.__name__}: {type(exc).__name__}: {exc}") from None
        pipe.to(dev)
        pipe.set_progress_bar_config(disable=True)
        if getattr(pipe, "vae", None) is not None:
            count_vae_calls(pipe.vae)  # shared by the from_pipe pipelines too
        return LoadedModel(model, {first_task: pipe}, pipe.scheduler.config)

    def pipeline(self, loaded: LoadedModel, task: str, controls: Sequence[ControlSpec] = ()) -> Any:
        """The task's pipeline (with these ControlNets, when there are any), made once from the
        loaded one with from_pipe."""
        key: Any = (task, *(c.name for c in controls)) if controls else task
        if key not in loaded.pipes:
            import diffusers

            first = next(iter(loaded.pipes.values()))
            if controls:
                nets = [self.controlnet(spec, first.unet.dtype) for spec in controls]
                pipe = control_pipeline(first, loaded.model.family, task, nets)
            else:
                pipe = getattr(diffusers, loaded.model.tasks[task]).from_pipe(first)
            pipe.set_progress_bar_config(disable=True)
            loaded.pipes[key] = pipe
        return loaded.pipes[key]

    def controlnet(self, spec: ControlSpec, dtype: Any) -> Any:
        from .torch_runtime import device

        dev = device()
        return self.cache.get(("controlnet", spec.entry.source, str(dev), str(dtype)), lambda: load_controlnet(spec, dtype, dev))

    def run(
        self,
        model: BaseModel,
        task: str,
        call: dict[str, Any],
        context: Context,
        scheduler: str = "",
        loras: dict[str, tuple[ModelEntry, float]] | None = None,
        controls: Sequence[ControlSpec] = (),
    ) -> np.ndarray:
        """One pipeline call; returns (N, H, W, 3) uint8, or with output_type="latent" the
        latents as (N, h, w, C) float32. Reports each denoising step to the
        context (which raises Cancelled once the caller has gone, stopping within a step).

        Text-to-image, image-to-image and inpainting calls are batched across requests: calls
        that arrive while the model is busy (or within TILECHAIN_BATCH_WINDOW_MS) and agree on
        everything but the prompts, seeds and images (images of one shape) run as one pipeline
        call. Each image keeps its own generator, so it is the image the call would have made
        alone (up to float rounding in batched kernels)."""
        loaded = self.load(model)
        request = _Request(call, context, num_images(call))
        key = batch_key(task, scheduler, loras, call)
        batchable = task in BATCHED_TASKS and isinstance(call.get("generator"), list) and not controls
        if model.family == "auto" and call.get("negative_prompt"):
            batchable = False  # Kandinsky's combined pipelines cannot batch negative prompts (docs/diffusion.md)
        if batchable:
            with self._queue_lock:
                loaded.queue.setdefault(key, []).append(request)
            if self.batch_window > 0:
                time.sleep(self.batch_window)  # let concurrent requests join the batch
        with loaded.lock:
            if request.finished:  # another request's thread ran it in its batch
                return request.outcome()
            if batchable:
                with self._queue_lock:
                    batch = loaded.queue.pop(key)
            else:
                batch = [request]
            self._run_batch(loaded, task, batch, scheduler, loras or {}, controls)
        return request.outcome()

    def _run_batch(
        self, loaded: LoadedModel, task: str, batch: list[_Request], scheduler: str, loras: dict[str, tuple[ModelEntry, float]],
        controls: Sequence[ControlSpec] = (),
    ) -> None:
        try:
            pipe = self.pipeline(loaded, task, controls)
            self._set_scheduler(pipe, loaded, scheduler)
            self._set_loras(pipe, loaded, loras)
            kwargs = dict(batch[0].call)
            if controls:
                kwargs = pipeline_arguments(task, controls, kwargs)
            if len(batch) > 1:
                kwargs.update(merge_calls([r.call for r in batch]))
                for request in batch:
                    request.context.notices.append(f"ran in one batch with {len(batch) - 1} other request(s)")
            parameters = inspect.signature(pipe.__call__).parameters
            kwargs.update(self._callback(pipe, parameters, batch, kwargs.get("num_inference_steps", 1)))
            image = kwargs.get("image")
            first = image[0] if isinstance(image, list) else image
            if "height" not in kwargs and "height" in parameters and hasattr(first, "getbbox"):
                # Kandinsky's img2img resizes its image to height x width (512 by default)
                kwargs["width"], kwargs["height"] = first.size
            if not kwargs.get("eta"):
                kwargs.pop("eta", None)
            elif "eta" not in parameters:  # the combined pipelines (Kandinsky) take no eta
                raise ParamError("eta", f"{type(pipe).__name__} takes no eta; leave eta at 0")
            kwargs.setdefault("output_type", "np")
            output = pipe(**kwargs).images
            if kwargs["output_type"] == "latent":
                images = latents_to_array(output)
            else:
                images = np.clip(np.rint(np.asarray(output) * 255.0), 0, 255).astype(np.uint8)
            start = 0
            for request in batch:
                request.result = images[start : start + request.count]
                start += request.count
        except BaseException as exc:  # every request of the batch fails the same way
            for request in batch:
                request.error = exc
        finally:
            for request in batch:
                request.finished = True

    @staticmethod
    def _set_scheduler(pipe: Any, loaded: LoadedModel, name: str) -> None:
        if name:
            pipe.scheduler = scheduler_class(name).from_config(loaded.scheduler_config)
        elif type(pipe.scheduler).__name__ != loaded.scheduler_config.get("_class_name", ""):
            import diffusers

            pipe.scheduler = getattr(diffusers, loaded.scheduler_config["_class_name"]).from_config(loaded.scheduler_config)
        if getattr(pipe, "decoder_pipe", None) is not None:  # combined pipelines run their decoder's
            pipe.decoder_pipe.scheduler = pipe.scheduler

    @staticmethod
    def _set_loras(pipe: Any, loaded: LoadedModel, loras: dict[str, tuple[ModelEntry, float]]) -> None:
        if not loras:
            if loaded.loras:
                pipe.disable_lora()
            return
        for name, (entry, _) in loras.items():
            adapter = _adapter_name(name)
            if adapter not in loaded.loras:
                try:
                    pipe.load_lora_weights(str(entry.path) if entry.path else entry.hub, adapter_name=adapter)
                except Exception as exc:
                    raise ParamError("loras", f"{name!r} does not load into {loaded.model.name!r}: {type(exc).__name__}: {exc}") from None
                loaded.loras.add(adapter)
        pipe.enable_lora()
        pipe.set_adapters([_adapter_name(n) for n in loras], [w for _, w in loras.values()])

    @staticmethod
    def _callback(pipe: Any, parameters: Any, batch: list[_Request], steps: int) -> dict[str, Any]:
        """Report each step to every request of the batch; stop when all have been cancelled
        (a batch goes on for the requests still waiting for it)."""

        def on_step(step: int) -> None:
            total = int(getattr(pipe, "_num_timesteps", 0) or steps)
            live = [r.context for r in batch if not r.context.cancel_event.is_set()]
            if not live:
                raise Cancelled()
            for context in live:
                if context.on_step is not None:
                    context.on_step(step + 1, total)

        if "callback_on_step_end" in parameters:
            def on_step_end(pipe_: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
                on_step(step)
                return tensors

            return {"callback_on_step_end": on_step_end}
        if "callback" in parameters:  # the upscale pipelines still use the older callback
            return {"callback": lambda step, timestep, latents: on_step(step), "callback_steps": 1}
        return {}


RUNTIME = DiffusionRuntime()


def count_vae_calls(vae: Any) -> None:
    """Count the images this VAE decodes and encodes (ServiceStats.vae_decodes/_encodes): the
    measure of what latent handoff saves."""
    decode, encode = vae.decode, vae.encode

    def counted_decode(z: Any, *args: Any, **kwargs: Any) -> Any:
        SERVICE_COUNTERS["vae_decodes"] += int(z.shape[0])
        return decode(z, *args, **kwargs)

    def counted_encode(x: Any, *args: Any, **kwargs: Any) -> Any:
        SERVICE_COUNTERS["vae_encodes"] += int(x.shape[0])
        return encode(x, *args, **kwargs)

    vae.decode, vae.encode = counted_decode, counted_encode


def latents_to_array(latents: Any) -> np.ndarray:
    """(N, C, h, w) tensor -> (N, h, w, C) float32: a latent canvas's layout."""
    return latents.detach().float().cpu().permute(0, 2, 3, 1).contiguous().numpy()


def array_to_latents(array: np.ndarray) -> Any:
    """(h, w, C) float32 -> (1, C, h, w) tensor; the pipeline moves it to its device and dtype."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))[None].astype(np.float32))


# --- stages --------------------------------------------------------------------------------


def prompt_params(default_model: str, steps: int = 25, cfg: float = 7.0) -> tuple[Param, ...]:
    """The params every prompted diffusion stage shares."""
    return (
        Param("model", str, default_model, "A base model named in models.yaml (or a folder under the models root)."),
        Param("prompt", str, "", "What to draw."),
        Param("negative_prompt", str, "", "What to avoid."),
        Param("steps", int, steps, "Denoising steps.", min=1, max=500),
        Param("cfg", float, cfg, "Classifier-free guidance scale; 1 or less turns guidance off.", min=0.0, max=50.0),
        Param("seed", int, -1, "Random seed; -1 picks one (recorded in the provenance).", min=-1, max=2**32 - 1),
    )


def sampling_params() -> tuple[Param, ...]:
    return (
        Param("scheduler", str, "", "A scheduler: a short name (euler-a, ddim, dpm-multi, ..., docs/onnx-web.md) or a diffusers class name (DDIMScheduler, ...); '' keeps the model's."),
        Param("clip_skip", int, 0, "Skip this many final CLIP layers for the prompt embedding.", min=0, max=12),
        Param("eta", float, 0.0, "DDIM-style eta, for schedulers that take it.", min=0.0, max=1.0),
        Param("loras", dict, {}, "LoRAs from models.yaml with their weights, e.g. {\"detail\": 0.8}.", ),
    )


def tile_params(default_overlap: int) -> tuple[Param, ...]:
    return (
        Param("tile", int, "auto", "Processing tile edge in input pixels; 'auto' is the model's native size.", min=64, max=4096, keywords=("auto",)),
        Param("overlap", int, default_overlap, "Input pixels shared by neighbouring tiles, blended with a feathered ramp.", min=0, max=1024),
    )


def strength_param(default: float) -> Param:
    return Param("strength", float, default, "How far to move from the input: 0 keeps it, 1 repaints it fully.", min=0.0, max=1.0)


def count_param(what: str = "Images per input image") -> Param:
    return Param("count", int, 1, f"{what}, made in one batched call; image v uses seed + v.", min=1, max=16)


def mask_blur_param(default: int = 4) -> Param:
    return Param("mask_blur", int, default, "Blur of the mask's edge in pixels; the result is blended back through the blurred mask.", min=0, max=128)


def pad_to_multiple(pixels: np.ndarray, multiple: int) -> np.ndarray:
    """Edge-pad (H, W, C) to multiples of `multiple` (the VAE and UNet need them)."""
    height, width = pixels.shape[:2]
    pad_y, pad_x = -height % multiple, -width % multiple
    if pad_y or pad_x:
        pixels = np.pad(pixels, ((0, pad_y), (0, pad_x), (0, 0)), mode="edge")
    return pixels


def tile_seed(seed: int, window: Rect) -> int:
    """Each tile its own noise (a repeated pattern would show), the same on every run; the
    tile at the origin, and so an untiled canvas, uses the seed itself."""
    return (seed + window.y * 65_537 + window.x) % 2**63


def generator(seed: int) -> Any:
    import torch

    # a CPU generator gives the same noise on every device
    return torch.Generator("cpu").manual_seed(seed)


class DiffusionStage(Stage):
    """A stage that runs a diffusers pipeline. Subclasses set `task` and build the call."""

    task: ClassVar[str]
    order = "spiral"
    # what the catalog shows: an SD 1.x model's native tile and the default overlap; a
    # running stage takes both from its model and params
    max_tile = 512
    overlap = 64
    scale: ClassVar[int] = 1             # output pixels per input pixel
    pad_multiple: ClassVar[int] = 8      # tiles are edge-padded to this multiple (the VAE's blocks)
    runtime: ClassVar[DiffusionRuntime] = RUNTIME
    requires = ("torch", "diffusers", "transformers", "cv2")  # cv2: the mask blur

    @classmethod
    def preload(cls, models: ModelRegistry, name: str) -> bool:
        if name not in models.entries["base"]:
            return False
        try:
            model = resolve_model(models, name, cls.task, cls.type)
        except ParamError:
            return False  # a model for another task (an inpainting checkpoint, an upscaler)
        loaded = cls.runtime.load(model)
        with loaded.lock:
            cls.runtime.pipeline(loaded, cls.task)
        return True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.p.get("seed") == -1:
            self.p["seed"] = secrets.randbelow(2**32 - 1)
        # (input canvas id, window) -> the variants of that tile not yet taken (see variant)
        self._variants: dict[tuple[int, Rect], dict[int, np.ndarray]] = {}

    def check_model(self) -> None:
        """Resolve and check the model, scheduler and LoRAs (no loading): ParamError naming
        the param when something does not fit."""
        self.model = resolve_model(self.context.models, self.p["model"], self.task, self.type)
        # the request's scheduler, else the one models.yaml names, else the model's own
        self.scheduler = self.p.get("scheduler", "") or self.model.scheduler
        name = self.scheduler or model_scheduler_name(self.model)
        if self.scheduler:
            scheduler_class(self.scheduler)
        if self.p.get("eta") and name and not scheduler_has_eta(scheduler_class(name)):
            raise ParamError("eta", f"the scheduler {name} takes no eta; use e.g. DDIMScheduler, or leave eta at 0")
        self.loras = check_loras(self.context.models, self.p.get("loras", {}), self.model) if self.p.get("loras") else {}
        self.controls = check_controls(
            self.context.models, self.p["control"], self.model.family, self.model.name, self.task, self.p["preprocessor"]
        ) if self.p.get("control") else []
        if self.model.family == "auto":
            # Kandinsky rounds sizes up to multiples of 64 (its MoVQ's factor squared)
            self.pad_multiple = max(self.pad_multiple, 64)
            if self.p.get("negative_prompt") and self.count > 1 and pipeline_class_name(self.model.entry).startswith("Kandinsky"):
                raise ParamError("negative_prompt", "Kandinsky's pipelines cannot pair a negative prompt with count > 1; make one image per request")
        tile = self.p.get("tile", "auto")
        # 'auto': the model's native size, in output pixels
        self.tile_in = max(64, self.model.native // self.scale) if tile == "auto" else tile
        self.overlap = self.p.get("overlap", 0) * self.scale
        if self.overlap and self.overlap >= self.tile_in * self.scale:
            raise ParamError("overlap", f"{self.p['overlap']} must be smaller than the tile ({self.tile_in})")

    def plan(self, inputs: list[Any]) -> list[Any]:
        self.adopt_chain_prompt(inputs)
        self.check_model()
        return super().plan(inputs)

    def output_canvas(self, image: Any) -> Any:
        width, height = image_size(image)
        return self.result_canvas(self.derived(image, width * self.scale, height * self.scale, RGB8))

    def tile_size(self) -> int:
        return 0 if self.needs_whole_canvas else self.tile_in * self.scale

    # --- latent handoff ----------------------------------------------------------------------

    @functools.cached_property
    def latent(self) -> tiles_pb2.Latent | None:
        """The model's latent space (check_model has resolved the model)."""
        return latent_space(self.model) if self.makes_latents or self.takes_latents else None

    def result_canvas(self, canvas: Any) -> Any:
        """An RGB8 output canvas, as a latent canvas instead when the gateway asked for latents
        (and the size is whole latent pixels; plan_outputs refuses the request otherwise)."""
        latent = self.latent
        if self.latent_output and latent is not None and not (canvas.width % latent.scale or canvas.height % latent.scale):
            canvas.format = LATENT_F32
            canvas.width, canvas.height = canvas.width // latent.scale, canvas.height // latent.scale
            canvas.latent.CopyFrom(latent)
        return canvas

    def handoff_space(self, outputs: list[OutputPlan], able: bool) -> str:
        """The latent space for a handoff, or "": latents travel only where the stage works in
        one tile (tiles are blended in pixels) and the images are whole latent pixels."""
        latent = self.latent
        if not able or latent is None:
            return ""
        tile = self.tile_size()
        for output in outputs:
            width, height = image_size(output.canvas)
            if (tile and max(width, height) > tile) or width % latent.scale or height % latent.scale:
                return ""
        return latent.space

    def emits_latent(self, outputs: list[OutputPlan]) -> str:
        return self.handoff_space(outputs, self.makes_latents)

    def accepts_latent(self, outputs: list[OutputPlan]) -> str:
        # ControlNet stages need pixels: the control image is made from them, or tiled with them
        return self.handoff_space(outputs, self.takes_latents and not self.controls)

    # --- ControlNet ------------------------------------------------------------------------------

    controls: list[ControlSpec] = []   # set by check_model from the `control` param

    def with_control(self, outputs: list[OutputPlan], inputs: list[Any]) -> list[OutputPlan]:
        """Tiled stages: an attached control image becomes a source of every output, so that
        each processing tile gets the control tile under it; it must have the image's size."""
        attached = self.attached(inputs, CONTROL)
        if not self.controls:
            if attached is not None:
                raise ParamError("control", "a control image is attached but the stage has no ControlNet: set control")
            return outputs
        if attached is not None:
            for output in outputs:
                self.require_same_size("control", "the attached control image", attached, output.sources["image"])
                output.sources["control"] = attached
        return outputs

    def control_call(self, work: TileWork) -> dict[str, Any]:
        """The ControlNet arguments for one processing tile: the control images from the
        attached control tile, or made from the tile's pixels."""
        if not self.controls:
            return {}
        attached = "control" in work.inputs
        picture = work.pixels("control") if attached else work.pixels("image")
        images = control_images(self.context.models, self.controls, picture, attached, self.p)
        return control_call(self.controls, images, self.p)

    # --- work ----------------------------------------------------------------------------------

    def prompt_call(self) -> dict[str, Any]:
        call: dict[str, Any] = {
            "prompt": self.p["prompt"],
            "negative_prompt": self.p["negative_prompt"] or None,
            "num_inference_steps": self.p["steps"],
            "guidance_scale": self.p["cfg"],
            "output_type": "latent" if self.latent_output else "np",
        }
        if self.p.get("clip_skip"):
            call["clip_skip"] = self.p["clip_skip"]
        if "eta" in self.p:
            call["eta"] = self.p["eta"]
        return call

    def run_pipeline(self, call: dict[str, Any]) -> np.ndarray:
        return self.runtime.run(self.model, self.task, call, self.context, self.scheduler, self.loras, self.controls)

    def tile_call(self, work: TileWork) -> dict[str, Any]:
        """The call for one processing tile, besides image and generator (img2img, upscale)."""
        raise NotImplementedError

    def input_rect(self, window: Rect, name: str, source: Any, output: Any) -> Rect:
        if is_latent(source) or is_latent(output):
            return Rect(0, 0, source.width, source.height)  # a handoff stage works in one tile
        # windows of scaling stages start on multiples of the scale (tile and overlap are
        # whole input pixels), so this is exact
        return window.scaled_down(self.scale, source.width, source.height)

    def process_tile(self, work: TileWork) -> np.ndarray:
        return self.variant(work, lambda: self.generate(work.window, work.pixels(), self.tile_call(work)))

    @property
    def count(self) -> int:
        return int(self.p.get("count", 1))

    def variant(self, work: TileWork, make: Callable[[], np.ndarray]) -> np.ndarray:
        """This output's image of the tile. With count > 1 each input image has `count`
        outputs (variant v uses seed + v); `make` runs them all as one batched call on the
        first variant's tile, and the others wait here until their own tiles ask for them."""
        if self.count == 1:
            return make()[0]
        key = (work.source().id, work.window)
        if key not in self._variants:
            self._variants[key] = dict(enumerate(make()))
        waiting = self._variants[key]
        out = waiting.pop(work.output.index % self.count)
        if not waiting:
            del self._variants[key]
        return out

    def variant_outputs(self, images: list[Any]) -> list[OutputPlan]:
        """`count` outputs per input image: image i's variant v has index i * count + v."""
        outputs = []
        for image in images:
            for v in range(self.count):
                canvas = self.output_canvas(image)
                canvas.index = image.index * self.count + v
                outputs.append(OutputPlan(canvas, {"image": image}))
        return outputs

    def jobs_with_steps(self, jobs: int) -> int:
        return jobs // self.count  # the variants of a tile run in one call

    def generate(self, window: Rect, pixels: np.ndarray, call: dict[str, Any], mask: np.ndarray | None = None) -> np.ndarray:
        """Run the pipeline on one tile's pixels (or latents) and mask, padded to the multiple
        the model needs; returns the tile's `count` output images (or latents), (N, h, w, C)."""
        from .codecs import to_pil

        seeds = [tile_seed(self.p["seed"] + v, window) for v in range(self.count)]
        if self.task in BATCHED_TASKS:  # a generator list: the runtime may batch it with other requests
            call = dict(call, generator=[generator(seed) for seed in seeds], num_images_per_prompt=self.count)
        else:  # the upscalers take one image, one generator
            call = dict(call, generator=generator(seeds[0]))
        if pixels.dtype == np.uint8:
            unit_in = 1
            padded = pad_to_multiple(pixels[:, :, :3], self.pad_multiple)
            call["image"] = to_pil(padded)
        else:  # latents handed over by the previous stage
            unit_in = self.latent.scale
            call["image"] = array_to_latents(pad_to_multiple(pixels, max(1, self.pad_multiple // unit_in)))
        if mask is not None:
            call["mask_image"] = to_pil(pad_to_multiple(mask[:, :, None], self.pad_multiple))
            call["height"], call["width"] = padded.shape[:2]
        if "control_image" in call:  # the ControlNets' control tiles, padded as the tile is
            call["control_image"] = [to_pil(pad_to_multiple(image, self.pad_multiple)) for image in call["control_image"]]
        out = self.run_pipeline(call)
        unit_out = self.latent.scale if call["output_type"] == "latent" else 1
        height, width = pixels.shape[0] * unit_in * self.scale // unit_out, pixels.shape[1] * unit_in * self.scale // unit_out
        return out[:, :height, :width]

    def inpaint(self, window: Rect, pixels: np.ndarray, mask: np.ndarray, call: dict[str, Any]) -> np.ndarray:
        """Repaint where the mask is white, `count` images (N, h, w, 3). The mask is blurred by
        mask_blur and the result is blended back over the original through it, so the unmasked
        pixels stay exactly as they were and the edge is soft. With an ordinary checkpoint (a
        4-channel UNet) diffusers' inpaint pipeline keeps the unmasked latents at each step:
        masked img2img."""
        weight = blur_mask(mask, self.p["mask_blur"])[:, :, None]
        soft = np.rint(weight[:, :, 0] * 255.0).astype(np.uint8)
        out = self.generate(window, pixels, call, soft).astype(np.float32)
        blended = pixels.astype(np.float32) * (1.0 - weight) + out * weight
        return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def blur_mask(mask: np.ndarray, radius: int) -> np.ndarray:
    """(H, W) uint8 mask -> (H, W) float32 in [0, 1], Gaussian-blurred by radius pixels."""
    weight = mask.astype(np.float32) / 255.0
    if radius <= 0:
        return weight
    import cv2

    size = 2 * radius + 1
    return cv2.GaussianBlur(weight, (size, size), sigmaX=radius / 2, borderType=cv2.BORDER_REPLICATE)
