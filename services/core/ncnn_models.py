"""ncnn models (a .param graph and its .bin weights) for upscale-ncnn, loaded by registry name or
path and cached per (file, Vulkan). ncnn runs them on the CPU, or on a Vulkan GPU when asked and
one is present; it is imported lazily (the `ncnn` PyPI package, in the models extra).

The .param reader is shared with `make models` (tilechain.real_weights), which converts the
ncnn files it knows into spandrel weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .models import ModelCache, ModelRegistry
from .params import ParamError

CACHE = ModelCache(max_models=4)


@dataclass
class Layer:
    kind: str
    name: str
    inputs: list[str]
    outputs: list[str]
    params: dict[int, str] = field(default_factory=dict)


def parse_param(text: str) -> list[Layer]:
    """The layers of an ncnn .param file (the text format: the magic 7767517, the layer and blob
    counts, then one layer a line: type, name, input and output counts, blobs, k=v params)."""
    lines = [line.split() for line in text.splitlines()]
    if not lines or lines[0] != ["7767517"]:
        raise ValueError("not an ncnn .param file (no 7767517 magic on the first line)")
    layers = []
    for parts in lines[2:]:
        if not parts:
            continue
        kind, name, n_in, n_out = parts[0], parts[1], int(parts[2]), int(parts[3])
        rest = parts[4:]
        params = dict((int(k), v) for k, v in (item.split("=", 1) for item in rest[n_in + n_out:]))
        layers.append(Layer(kind, name, rest[:n_in], rest[n_in:n_in + n_out], params))
    return layers


@dataclass
class NcnnModel:
    """A loaded ncnn net and what the upscale stages need to know about it."""

    net: Any
    input_blob: str
    output_blob: str
    scale: int
    vulkan: bool
    input_channels: int = 3
    output_channels: int = 3

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (H * scale, W * scale, 3) uint8: the net sees RGB in 0..1."""
        import ncnn

        height, width = pixels.shape[:2]
        mat = ncnn.Mat.from_pixels(np.ascontiguousarray(pixels[:, :, :3]), ncnn.Mat.PixelType.PIXEL_RGB, width, height)
        mat.substract_mean_normalize([0.0, 0.0, 0.0], [1 / 255.0] * 3)
        extractor = self.net.create_extractor()
        extractor.input(self.input_blob, mat)
        status, out = extractor.extract(self.output_blob)
        if status != 0:
            raise RuntimeError(f"ncnn failed to run the net (status {status})")
        array = np.asarray(out).transpose(1, 2, 0)
        return np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)


def vulkan_available() -> bool:
    import ncnn

    try:
        return ncnn.get_gpu_count() > 0
    except Exception:  # no Vulkan loader or driver
        return False


def load_ncnn(registry: ModelRegistry, name: str, vulkan: bool) -> NcnnModel:
    """The ncnn model for a registry name or a .param path under the models root (its .bin
    beside it), or ParamError naming 'model'."""
    entry = registry.resolve("upscalers", name)
    param = entry.path
    if param is None or param.suffix != ".param":
        shown = param.name if param is not None else entry.source
        raise ParamError("model", f"{name!r} ({shown}) is not an ncnn .param file; upscale-ncnn runs ncnn models (a .param and its .bin)")
    weights = param.with_suffix(".bin")
    for path in (param, weights):
        if not path.is_file():
            raise ParamError("model", f"{name!r}: {path.name} is missing under the models root (`make models` extracts the ncnn files)")
    use_vulkan = vulkan and vulkan_available()
    return CACHE.get((str(param), use_vulkan), lambda: _load(name, param, weights, use_vulkan))


def _load(name: str, param: Path, weights: Path, vulkan: bool) -> NcnnModel:
    import ncnn

    try:
        layers = parse_param(param.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ParamError("model", f"{name!r} ({param.name}): {exc}") from None
    inputs = [layer.outputs[0] for layer in layers if layer.kind == "Input"]
    if len(inputs) != 1 or not layers[-1].outputs:
        raise ParamError("model", f"{name!r} ({param.name}): an upscaler has one input and one output blob")
    net = ncnn.Net()
    net.opt.use_vulkan_compute = vulkan
    if net.load_param(str(param)) != 0 or net.load_model(str(weights)) != 0:
        raise ParamError("model", f"{name!r}: ncnn cannot load {param.name} with {weights.name}")
    model = NcnnModel(net, inputs[0], layers[-1].outputs[0], 1, vulkan)
    # the factor, from a probe: ncnn graphs state it in several ways (PixelShuffle, Interp, ...)
    probe = model(np.zeros((16, 16, 3), np.uint8))
    if probe.shape[0] % 16 or probe.shape[0] != probe.shape[1] or probe.shape[2] != 3:
        raise ParamError("model", f"{name!r} makes {probe.shape} from a 16x16 RGB image: not an upscaler by a whole factor")
    model.scale = probe.shape[0] // 16
    return model
